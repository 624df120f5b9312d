//! The supervisor's side of a worker's control channel: PING, STATS, LOAD,
//! NEURAL_EXEC and SHUTDOWN over `evod_ring`, with deadlines.
//!
//! A client is taken for each call and released after it (the ring lets a
//! new client take over a channel synced for the current epoch), so no
//! borrow of the segment outlives a call. Everything in a reply is checked
//! by `protocol`'s decoders: the worker is untrusted.
//!
//! The calls block up to their deadline, so the event loop never makes
//! them itself: each worker slot has one [`LinkThread`] that owns the
//! calls on that slot's control channel, runs the [`Job`]s it is sent one
//! at a time, and answers each with a [`Done`] on the loop's channel,
//! tagged ([`Tag`]) with the job's id and the epoch it was sent under, so
//! the loop drops a late answer meant for a worker it has replaced since.
//! A job that comes up after the worker it was queued for was replaced is
//! never sent: it is answered [`LinkError::Stale`] (a fault queued behind
//! a long call must not kill the healthy replacement). A job may carry an
//! expiry (`evod exec`'s rows): not started by then, it is answered
//! [`LinkError::Expired`] without being sent.

use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use evod_ring::{Channel, ClientConfig, RingError, Segment};

use evod_wire::protocol::{self, ExecHeader, LoadRequest, WorkerInfo, op};

/// What went wrong talking to a worker.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The ring failed (peer lost, timeout, corrupt).
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The worker answered with an error status.
    #[error("worker refused {opcode}: {message} (status {status})")]
    Refused {
        /// Opcode name.
        opcode: &'static str,
        /// Status code.
        status: i32,
        /// The worker's message.
        message: String,
    },
    /// The job was queued for an incarnation of the worker that has been
    /// replaced since: it was not sent (it must never reach the new one).
    #[error("not sent: the worker it was meant for (epoch {sent}) was replaced (epoch {current})")]
    Stale {
        /// The epoch the job was queued under.
        sent: u64,
        /// The segment's epoch when the job came up.
        current: u64,
    },
    /// The job waited in the worker's queue past its deadline (its client
    /// has given up): it was not sent.
    #[error("not sent: it waited {waited:?} for the worker's earlier calls, past its deadline")]
    Expired {
        /// How long it waited.
        waited: Duration,
    },
    /// The reply did not decode.
    #[error("bad {opcode} reply from the worker: {problem}")]
    BadReply {
        /// Opcode name.
        opcode: &'static str,
        /// What is wrong.
        problem: String,
    },
}

/// How long a send waits for room in the lane (a request sent earlier
/// without waiting may still be in the worker's hands): a worker that does
/// not take a request in that time is hung or dead.
const SEND_PATIENCE: Duration = Duration::from_millis(500);

/// A client whose peer counts as lost once the worker's heartbeat is
/// `peer_timeout` old. The link threads use the daemon's
/// `--heartbeat-timeout`, the watchdog's own limit: a worker busy in a long
/// call that beats less often than that (a big model's forward pass or
/// parameter gather, under load) is not given up on while the watchdog
/// still counts it alive. A dead worker is not waited for that long: its
/// reaping bumps the segment's epoch, which wakes the call at once
/// (`PeerLost`).
fn client_config(peer_timeout: Duration) -> ClientConfig {
    ClientConfig {
        peer_timeout,
        ..ClientConfig::default()
    }
}

/// Sends `opcode` with a payload filled by `fill`, waits for the reply until
/// `timeout`, and hands the checked payload to `decode`.
///
/// A request sent earlier without waiting (`send_only`: a fault, SHUTDOWN)
/// may still be in the worker's hands: then the lane has no room for a new
/// client yet, and the send is retried for up to [`SEND_PATIENCE`]; that
/// request's reply, if it comes, is dropped, never taken for this one.
/// The worker counts as lost once its heartbeat is `peer` old.
#[allow(clippy::too_many_arguments)]
fn call<T>(
    seg: &Segment,
    peer: Duration,
    opcode: u32,
    len: usize,
    fill: impl Fn(&mut [u8]),
    timeout: Duration,
    decode: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<T, LinkError> {
    let deadline = crate::policy::later(Instant::now(), timeout);
    let room_deadline = deadline.min(Instant::now() + SEND_PATIENCE);
    let mut client = seg.client_with(Channel::Control, client_config(peer))?;
    let id = loop {
        match client.send(opcode, 0, len, &fill) {
            Ok(id) => break id,
            Err(RingError::Full) if Instant::now() < room_deadline => {
                std::thread::sleep(Duration::from_micros(100));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let (status, payload) = protocol::receive_id(&mut client, id, deadline)?;
    if status != protocol::status::OK {
        let text = String::from_utf8_lossy(&payload[..payload.len().min(4096)]);
        return Err(LinkError::Refused {
            opcode: op::name(opcode),
            status,
            message: text.into_owned(),
        });
    }
    decode(&payload).map_err(|problem| LinkError::BadReply {
        opcode: op::name(opcode),
        problem,
    })
}

/// A PING round trip; returns its duration. The worker counts as lost
/// once its heartbeat is `peer` old (as in every call here).
pub fn ping(seg: &Segment, peer: Duration, timeout: Duration) -> Result<Duration, LinkError> {
    let start = Instant::now();
    call(seg, peer, op::PING, 0, |_| {}, timeout, |_| Ok(()))?;
    Ok(start.elapsed())
}

/// Asks the worker to map and serve `request.path`.
pub fn load(
    seg: &Segment,
    peer: Duration,
    request: &LoadRequest,
    timeout: Duration,
) -> Result<WorkerInfo, LinkError> {
    let body = protocol::to_bincode(request);
    call(
        seg,
        peer,
        op::LOAD,
        body.len(),
        |out| out.copy_from_slice(&body),
        timeout,
        |p| protocol::from_bincode(p).map_err(|e| e.to_string()),
    )
}

/// Runs the live model on one input row.
pub fn exec(
    seg: &Segment,
    peer: Duration,
    inputs: &[f32],
    timeout: Duration,
) -> Result<Vec<f32>, LinkError> {
    let header = ExecHeader {
        batch: 1,
        inputs: u32::try_from(inputs.len()).map_err(|_| LinkError::BadReply {
            opcode: "NEURAL_EXEC",
            problem: "too many inputs".into(),
        })?,
    };
    let len = ExecHeader::SIZE + 4 * inputs.len();
    call(
        seg,
        peer,
        op::NEURAL_EXEC,
        len,
        |out| header.encode(inputs, out),
        timeout,
        |p| {
            if p.len() % 4 != 0 {
                return Err(format!("{} bytes is not a whole number of f32", p.len()));
            }
            Ok(protocol::read_f32s(p))
        },
    )
}

/// Sends a request without waiting for its reply (SHUTDOWN, fault opcodes).
pub fn send_only(
    seg: &Segment,
    peer: Duration,
    opcode: u32,
    payload: &[u8],
) -> Result<(), LinkError> {
    let mut client = seg.client_with(Channel::Control, client_config(peer))?;
    client.send(opcode, 0, payload.len(), |out| out.copy_from_slice(payload))?;
    Ok(())
}

/// A call for a [`LinkThread`] to make.
#[derive(Debug, Clone)]
pub enum Job {
    /// [`ping`].
    Ping,
    /// [`load`].
    Load(LoadRequest),
    /// [`exec`].
    Exec(Vec<f32>),
    /// [`send_only`].
    Send {
        /// The opcode.
        opcode: u32,
        /// Its payload.
        payload: Vec<u8>,
    },
}

impl Job {
    /// The outcome of this job when it is not sent, failed with `error`.
    fn unsent(&self, error: impl FnOnce() -> LinkError) -> Outcome {
        match self {
            Job::Ping => Outcome::Ping(Err(error())),
            Job::Load(_) => Outcome::Load(Err(error())),
            Job::Exec(_) => Outcome::Exec(Err(error()), Duration::ZERO),
            Job::Send { .. } => Outcome::Sent(Err(error())),
        }
    }
}

/// What a [`Job`] came to.
#[derive(Debug)]
pub enum Outcome {
    /// Of [`Job::Ping`]: the round trip.
    Ping(Result<Duration, LinkError>),
    /// Of [`Job::Load`].
    Load(Result<WorkerInfo, LinkError>),
    /// Of [`Job::Exec`]: the outputs, and how long the call took.
    Exec(Result<Vec<f32>, LinkError>, Duration),
    /// Of [`Job::Send`].
    Sent(Result<(), LinkError>),
}

impl Outcome {
    /// The error, if the call failed.
    pub fn error(&self) -> Option<&LinkError> {
        match self {
            Outcome::Ping(r) => r.as_ref().err(),
            Outcome::Load(r) => r.as_ref().err(),
            Outcome::Exec(r, _) => r.as_ref().err(),
            Outcome::Sent(r) => r.as_ref().err(),
        }
    }
}

/// Which job an answer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// The job's id (the loop's own count).
    pub id: u64,
    /// The segment's trusted epoch when the job was sent.
    pub epoch: u64,
}

/// A finished job.
#[derive(Debug)]
pub struct Done {
    /// The tag it was sent with.
    pub tag: Tag,
    /// What came of it.
    pub outcome: Outcome,
    /// How long the call took (from when the thread started it).
    pub took: Duration,
    /// When the call ended (the reply was taken, or it failed): the
    /// moment a worker's answer is known, before the hop to the loop.
    pub finished: Instant,
}

/// The thread that makes every call on one worker's control channel.
/// Dropping it ends the thread once its current call returns.
#[derive(Debug)]
pub struct LinkThread {
    jobs: mpsc::Sender<Queued>,
}

/// A job in a [`LinkThread`]'s queue.
#[derive(Debug)]
struct Queued {
    tag: Tag,
    job: Job,
    timeout: Duration,
    queued: Instant,
    expires: Option<Instant>,
}

impl LinkThread {
    /// Starts the thread `name` for `seg`; each finished job is handed to
    /// `wrap` and sent on `to_loop`. A call gives the worker up once its
    /// heartbeat is `peer_timeout` old (see [`client_config`]).
    pub fn start<E: Send + 'static>(
        name: String,
        seg: Arc<Segment>,
        peer_timeout: Duration,
        to_loop: mpsc::Sender<E>,
        wrap: impl Fn(Done) -> E + Send + 'static,
    ) -> std::io::Result<LinkThread> {
        let (jobs, rx) = mpsc::channel::<Queued>();
        std::thread::Builder::new().name(name).spawn(move || {
            for queued in rx {
                let Queued {
                    tag,
                    job,
                    timeout,
                    queued,
                    expires,
                } = queued;
                let started = Instant::now();
                // A job queued for an incarnation replaced since (behind a
                // long call) never reaches the new one: a fault meant for
                // the old worker would kill a healthy replacement.
                let current = seg.trusted_epoch();
                let outcome = if current != tag.epoch {
                    job.unsent(|| LinkError::Stale {
                        sent: tag.epoch,
                        current,
                    })
                } else if expires.is_some_and(|at| started >= at) {
                    // Its client has given up: not worth holding up the
                    // jobs behind it (LOAD, the canary) for.
                    job.unsent(|| LinkError::Expired {
                        waited: started - queued,
                    })
                } else {
                    match job {
                        Job::Ping => Outcome::Ping(ping(&seg, peer_timeout, timeout)),
                        Job::Load(request) => {
                            Outcome::Load(load(&seg, peer_timeout, &request, timeout))
                        }
                        Job::Exec(inputs) => {
                            let start = Instant::now();
                            let result = exec(&seg, peer_timeout, &inputs, timeout);
                            Outcome::Exec(result, start.elapsed())
                        }
                        Job::Send { opcode, payload } => {
                            Outcome::Sent(send_only(&seg, peer_timeout, opcode, &payload))
                        }
                    }
                };
                let finished = Instant::now();
                let took = finished - started;
                let done = Done {
                    tag,
                    outcome,
                    took,
                    finished,
                };
                if to_loop.send(wrap(done)).is_err() {
                    break;
                }
            }
        })?;
        Ok(LinkThread { jobs })
    }

    /// Queues `job` with its `timeout` (the deadline runs from when the
    /// thread starts it). A job not started by `expires` is not sent
    /// ([`LinkError::Expired`]). False if the thread is gone.
    pub fn submit(&self, tag: Tag, job: Job, timeout: Duration, expires: Option<Instant>) -> bool {
        self.jobs
            .send(Queued {
                tag,
                job,
                timeout,
                queued: Instant::now(),
                expires,
            })
            .is_ok()
    }
}

/// Whether `e` is a request the worker did not answer in time (as
/// opposed to a refusal, a lost peer or a broken protocol).
pub fn is_timeout(e: &LinkError) -> bool {
    matches!(e, LinkError::Ring(RingError::Timeout | RingError::Full))
}

#[cfg(test)]
mod tests {
    use super::*;
    use evod_ring::LayoutConfig;

    #[test]
    fn a_job_queued_for_a_replaced_worker_is_answered_stale_and_never_sent() {
        let seg = Arc::new(Segment::create(&LayoutConfig::default()).expect("segment"));
        let (tx, rx) = mpsc::channel();
        let thread = LinkThread::start(
            "link-test".into(),
            Arc::clone(&seg),
            Duration::from_secs(5),
            tx,
            |d| d,
        )
        .expect("link thread");
        let old = seg.trusted_epoch();
        // The worker it was queued for is replaced before the job comes up.
        let new = seg.bump_epoch();
        assert_ne!(old, new);
        let tag = Tag { id: 7, epoch: old };
        let job = Job::Send {
            opcode: protocol::op::FAULT_SEGV,
            payload: 0u32.to_le_bytes().to_vec(),
        };
        assert!(thread.submit(tag, job, Duration::ZERO, None));
        let done = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the job is answered");
        assert_eq!(done.tag, tag);
        match done.outcome {
            Outcome::Sent(Err(LinkError::Stale { sent, current })) => {
                assert_eq!((sent, current), (old, new));
            }
            other => panic!("expected a stale answer, got {other:?}"),
        }
        // Nothing reached the ring: the new incarnation's server sees no
        // request.
        let mut server = seg.server().expect("server");
        let got = server.recv(Duration::ZERO).expect("recv");
        assert!(got.is_none(), "a stale job reached the ring");
    }

    /// A worker that takes its time over a call without beating (a big
    /// model's gather and forward pass) is waited for up to the link's
    /// peer timeout, not given up after half a second; its death (the
    /// epoch bumped) ends the wait at once.
    #[test]
    fn a_call_outwaits_a_silent_worker_up_to_the_peer_timeout() {
        let seg = Arc::new(Segment::create(&LayoutConfig::default()).expect("segment"));
        let srv = Arc::clone(&seg);
        let worker = std::thread::spawn(move || {
            let mut server = srv.server().expect("server");
            loop {
                if let Some((_, request)) = server.recv(Duration::from_secs(10)).expect("recv") {
                    // No beat meanwhile: twice the old 500 ms limit.
                    std::thread::sleep(Duration::from_millis(1200));
                    request.reply_bytes(0, &[]).expect("reply");
                    return;
                }
            }
        });
        let took = ping(&seg, Duration::from_secs(5), Duration::from_secs(20))
            .expect("answered after 1.2 s of silence");
        assert!(took >= Duration::from_millis(1200), "{took:?}");
        worker.join().unwrap();

        // Nobody serves: the epoch bump of a replacement ends the call
        // long before its peer timeout or deadline.
        let bumper = Arc::clone(&seg);
        let bump = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            bumper.bump_epoch();
        });
        let start = Instant::now();
        let e = ping(&seg, Duration::from_secs(30), Duration::from_secs(30)).unwrap_err();
        assert!(
            matches!(e, LinkError::Ring(RingError::PeerLost { .. })),
            "{e}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        bump.join().unwrap();
    }

    #[test]
    fn a_job_past_its_deadline_is_answered_expired_and_never_sent() {
        let seg = Arc::new(Segment::create(&LayoutConfig::default()).expect("segment"));
        let (tx, rx) = mpsc::channel();
        let thread = LinkThread::start(
            "link-test".into(),
            Arc::clone(&seg),
            Duration::from_secs(5),
            tx,
            |d| d,
        )
        .expect("link thread");
        let tag = Tag {
            id: 1,
            epoch: seg.trusted_epoch(),
        };
        // Already expired when queued (as after a long wait behind a slow
        // call).
        let expires = Some(Instant::now());
        let job = Job::Exec(vec![0.0; 4]);
        assert!(thread.submit(tag, job, Duration::from_secs(5), expires));
        let done = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the job is answered");
        assert_eq!(done.tag, tag);
        match done.outcome {
            Outcome::Exec(Err(LinkError::Expired { .. }), _) => {}
            other => panic!("expected an expired answer, got {other:?}"),
        }
        let mut server = seg.server().expect("server");
        let got = server.recv(Duration::ZERO).expect("recv");
        assert!(got.is_none(), "an expired job reached the ring");
    }
}
