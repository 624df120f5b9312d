//! Broker traffic and overhead per ES candidate against a local
//! `redis-server` it starts (loopback, AOF fsynced every second, as in
//! production): a coordinator enqueues generations, one evaluator reads,
//! acknowledges with results (no evaluation: the fitness is made up) and
//! the coordinator collects them.
//!
//! `cargo run --release -p evod-broker --example broker_overhead -- [GENERATIONS] [CANDIDATES] [PER_TASK]`
//!
//! Prints the wire bytes per candidate (task share + result), the server's
//! network bytes (in + out, all commands and replies) per candidate and
//! the wall time per candidate of enqueue + read + ack + collect.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use evod_broker::{Coordinator, Evaluator, RedisBroker, RedisConfig, Task, TaskResult, Work};
use evod_evolve::{Recipe, Sign, TensorScale};

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let generations = args.first().copied().unwrap_or(50);
    let candidates = args.get(1).copied().unwrap_or(256) as u32;
    let per_task = args.get(2).copied().unwrap_or(16) as u32;
    assert!(
        candidates.is_multiple_of(per_task),
        "CANDIDATES must be a multiple of PER_TASK"
    );

    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
        .arg(dir.path())
        .args([
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ])
        .args(["--logfile", "redis.log"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (Debian package redis-server) on PATH");
    let url = format!("redis://127.0.0.1:{port}/");
    let mut coord = RedisBroker::new(RedisConfig::new(&url, "bench", "coord")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while coord.ping().is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut ev = RedisBroker::new(RedisConfig::new(&url, "bench", "host-a")).unwrap();
    let lease = coord
        .acquire_lease("coord", Duration::from_secs(60), Duration::ZERO)
        .unwrap();
    ev.heartbeat(1).unwrap();
    let _ = ev.read_tasks(1, Duration::from_millis(1)).unwrap(); // creates the group

    let base = 0x5eed_u64;
    let tasks_of = |g: u64| -> Vec<Task> {
        (0..candidates / per_task)
            .map(|t| Task {
                run: "bench".into(),
                generation: g,
                seed: 7,
                episodes: 1,
                first: t * per_task,
                gate: false,
                work: Work::Recipes {
                    base,
                    recipes: (0..per_task)
                        .map(|i| {
                            let c = u64::from(t * per_task + i);
                            let sign = if c % 2 == 0 { Sign::Plus } else { Sign::Minus };
                            Recipe::new(base, (g << 32) | (c / 2), 0.02, sign, TensorScale::Glorot)
                        })
                        .collect(),
                },
            })
            .collect()
    };
    let wire_task: usize = tasks_of(0).iter().map(|t| t.encode().unwrap().len()).sum();
    let wire_result = TaskResult {
        run: "bench".into(),
        generation: 0,
        candidate: 0,
        fitness: 0.0,
        host: "host-a".into(),
    }
    .encode()
    .unwrap()
    .len();

    let net = || -> u64 {
        let mut c = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let info: String = redis::cmd("INFO").arg("stats").query(&mut c).unwrap();
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap()
        };
        field("total_net_input_bytes") + field("total_net_output_bytes")
    };
    let net_before = net();
    let start = Instant::now();
    for g in 0..generations {
        coord
            .enqueue(&lease, evod_broker::Round { id: g, step: g }, &tasks_of(g))
            .unwrap();
        let mut done = 0;
        while done < candidates as usize {
            for d in ev.read_tasks(64, Duration::from_secs(1)).unwrap() {
                let results: Vec<TaskResult> = d
                    .task
                    .candidates()
                    .map(|candidate| TaskResult {
                        run: "bench".into(),
                        generation: g,
                        candidate,
                        fitness: f64::from(candidate),
                        host: "host-a".into(),
                    })
                    .collect();
                done += ev.ack(&d, &results).unwrap().recorded;
            }
        }
        let got = coord
            .wait_results(g, candidates as usize, Duration::from_secs(10))
            .unwrap();
        assert_eq!(got.len(), candidates as usize);
        coord.retire(&lease, g + 1, "0-0").unwrap();
    }
    let elapsed = start.elapsed();
    // Two INFO round trips (this one's request and the first one's reply)
    // are counted too: a few kB over the whole run.
    let net_bytes = net() - net_before;
    let total = generations * u64::from(candidates);
    println!(
        "{generations} generations × {candidates} candidates, {per_task} per task, 1 evaluator, loopback"
    );
    println!(
        "wire bytes per candidate: task {:.1} + result {wire_result} = {:.1}",
        wire_task as f64 / f64::from(candidates),
        wire_task as f64 / f64::from(candidates) + wire_result as f64
    );
    println!(
        "redis network bytes per candidate (in + out): {:.1}",
        net_bytes as f64 / total as f64
    );
    println!(
        "overhead per candidate (enqueue + read + ack + collect): {:.1} µs",
        elapsed.as_secs_f64() * 1e6 / total as f64
    );
    let _ = server.kill();
    let _ = server.wait();
}
