//! Queue behaviour within one process (server on a thread): wrap-around,
//! full, empty, largest payload, endpoint claims and the heartbeat grace.

mod common;

use common::eventually;
use std::time::{Duration, Instant};

use evod_ring::{
    Channel, ClientConfig, LayoutConfig, RingError, Segment, ServerConfig, WaitPolicy,
};

fn seg() -> Segment {
    Segment::create(&LayoutConfig {
        queue_depth: 4,
        payload_bytes: 1024,
    })
    .expect("create")
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// Echo server for `n` requests on a scoped thread.
fn serve(seg: &Segment, n: usize) {
    let mut server = seg.server().expect("server");
    let mut done = 0;
    while done < n {
        if let Some((_, req)) = server.recv(Duration::from_secs(10)).expect("recv") {
            // Odd opcodes take the one-copy path, even ones the `fill` path.
            if req.header.opcode % 2 == 1 {
                let p = req.payload;
                req.reply_bytes(7, p).expect("reply_bytes");
            } else {
                let len = req.payload.len();
                req.reply(7, len, |i, o| o.copy_from_slice(i))
                    .expect("reply");
            }
            done += 1;
        }
    }
}

#[test]
fn wrap_around_keeps_order_and_bytes() {
    let seg = seg();
    std::thread::scope(|s| {
        s.spawn(|| serve(&seg, 400));
        let mut client = seg.client(Channel::Eval).expect("client");
        for i in 0..400u32 {
            // Sizes that do not divide the 1024-byte area, so it wraps at odd places.
            let len = [0usize, 1, 300, 700, 1024][i as usize % 5];
            let r = if i % 2 == 1 {
                client
                    .send_bytes(i, 0, &vec![i as u8; len])
                    .expect("send_bytes");
                client.recv(soon()).expect("recv")
            } else {
                client
                    .call(i, 0, len, |b| b.fill(i as u8), soon())
                    .expect("call")
            };
            assert_eq!(r.status(), 7);
            assert_eq!(r.header.opcode, i);
            assert_eq!(r.payload.len(), len);
            assert!(
                r.payload.iter().all(|&b| b == i as u8),
                "payload of request {i} corrupted"
            );
        }
    });
}

#[test]
fn full_queue_and_full_payload_area() {
    let seg = seg();
    let mut client = seg.client(Channel::Eval).expect("client");
    for _ in 0..4 {
        client.send(1, 0, 0, |_| {}).expect("send");
    }
    assert!(
        matches!(client.send(1, 0, 0, |_| {}), Err(RingError::Full)),
        "5th message in a 4-deep queue"
    );
    assert_eq!(client.in_flight().len(), 4);

    let seg = self::seg();
    let mut client = seg.client(Channel::Control).expect("client");
    client.send(1, 0, 1000, |_| {}).expect("first 1000 bytes");
    assert!(
        matches!(client.send(1, 0, 64, |_| {}), Err(RingError::Full)),
        "payload area should be full"
    );
    client
        .send(1, 0, 0, |_| {})
        .expect("an empty payload still fits");
}

#[test]
fn empty_queue_times_out_on_both_sides() {
    let seg = seg();
    let mut server = seg.server().expect("server");
    let t = Instant::now();
    assert!(
        server
            .recv(Duration::from_millis(30))
            .expect("recv")
            .is_none()
    );
    assert!(t.elapsed() >= Duration::from_millis(30));
    let mut client = seg.client(Channel::Eval).expect("client");
    assert!(matches!(
        client.recv(soon()),
        Err(RingError::NothingInFlight)
    ));
    client.send(1, 0, 0, |_| {}).expect("send");
    let t = Instant::now();
    match client.recv(Instant::now() + Duration::from_millis(30)) {
        Err(RingError::Timeout) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(30));
}

#[test]
fn largest_payload_fits_and_one_more_byte_does_not() {
    let seg = seg();
    std::thread::scope(|s| {
        s.spawn(|| serve(&seg, 3));
        let mut client = seg.client(Channel::Eval).expect("client");
        for k in 0..3u8 {
            let r = client
                .call(1, 0, 1024, |b| b.fill(k), soon())
                .expect("largest payload");
            assert_eq!(r.payload.len(), 1024);
            assert!(r.payload.iter().all(|&b| b == k));
        }
        match client.send(1, 0, 1025, |_| {}) {
            Err(RingError::PayloadTooLarge {
                len: 1025,
                max: 1024,
            }) => {}
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }
    });
}

#[test]
fn one_endpoint_of_each_kind_per_process() {
    let seg = seg();
    let c = seg.client(Channel::Eval).expect("client");
    assert!(matches!(
        seg.client(Channel::Eval),
        Err(RingError::InUse { .. })
    ));
    let _other = seg
        .client(Channel::Control)
        .expect("the other channel is free");
    let s = seg.server().expect("server");
    assert!(matches!(seg.server(), Err(RingError::InUse { .. })));
    drop((c, s));
    seg.client(Channel::Eval).expect("free again after drop");
    seg.server().expect("free again after drop");
}

#[test]
fn no_worker_at_all_is_peer_lost_after_the_grace_period() {
    let seg = seg();
    let cfg = ClientConfig {
        peer_timeout: Duration::from_millis(100),
        wait: WaitPolicy {
            spin: Duration::ZERO,
            slice: Duration::from_millis(10),
        },
    };
    let mut client = seg.client_with(Channel::Eval, cfg).expect("client");
    let id = client.send(1, 0, 0, |_| {}).expect("send");
    let t = Instant::now();
    match client.recv(soon()) {
        Err(RingError::PeerLost { in_flight, .. }) => assert_eq!(in_flight, vec![id]),
        other => panic!("expected PeerLost, got {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );
    assert!(client.in_flight().is_empty());
}

/// A client releasing a reply does not notify (no fence on the round trip);
/// a server parked for room in the response lane must still be woken by the
/// client's next fenced point: its next park (`recv`) or its next `send`.
/// The server parks at once with a 30 s slice, so a lost wake-up shows as a
/// 5 s timeout.
#[test]
fn server_parked_for_room_is_woken_after_the_release() {
    for next_is_send in [false, true] {
        let seg = seg();
        let park = WaitPolicy {
            spin: Duration::ZERO,
            slice: Duration::from_secs(30),
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                let cfg = ServerConfig {
                    wait: park,
                    reply_wait: Duration::from_secs(30),
                    beat_interval: Duration::from_secs(30),
                };
                let mut server = seg.server_with(cfg).expect("server");
                for _ in 0..2 {
                    let (_, req) = server
                        .recv(Duration::from_secs(10))
                        .expect("recv")
                        .expect("a request");
                    // 1000 of 1024 bytes: the second reply waits for the first.
                    req.reply(0, 1000, |_, o| o.fill(9)).expect("reply");
                }
            });
            // After a `send`, the client spins (never parks within the
            // deadline), so only the send itself can have woken the server.
            let wait = if next_is_send {
                WaitPolicy {
                    spin: Duration::from_secs(30),
                    ..park
                }
            } else {
                park
            };
            let cfg = ClientConfig {
                peer_timeout: Duration::from_secs(60),
                wait,
            };
            let mut client = seg.client_with(Channel::Eval, cfg).expect("client");
            client.send(1, 0, 0, |_| {}).expect("send 1");
            client.send(1, 0, 0, |_| {}).expect("send 2");
            let first = client.recv(soon()).expect("first reply");
            assert_eq!(first.payload.len(), 1000);
            assert!(
                eventually(Duration::from_secs(10), || seg
                    .server_parked_for_room(Channel::Eval)),
                "the server never parked waiting for room"
            );
            drop(first);
            if next_is_send {
                client.send(1, 0, 0, |_| {}).expect("send 3");
            }
            let t = Instant::now();
            let second = client
                .recv(Instant::now() + Duration::from_secs(5))
                .expect("second reply: the parked server was not woken");
            assert_eq!(second.payload.len(), 1000);
            assert!(t.elapsed() < Duration::from_secs(5));
        });
    }
}
