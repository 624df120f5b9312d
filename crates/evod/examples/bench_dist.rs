//! `cargo xtask bench dist`: a distributed run's broker traffic, broker
//! work and throughput as evaluator hosts are added, with real hosts:
//! Redis (`evod-redis:local`), a coordinator and evaluator containers
//! (`evod:local`, `evod join`) on a private Docker network. `cargo xtask
//! bench dist` builds both images first.
//!
//! - **Scaling.** For 1, 2, 4, 8 and 16 evaluator containers, each held to
//!   a twentieth of a CPU (`docker run --cpus 0.05`: 16 of them take 0.8 of
//!   a 2-core machine, leaving the rest for the coordinator, Redis and the
//!   machine itself, so that the quota — not the machine — is what limits
//!   every host up to 16), the same ES run (same seed, so the same work:
//!   the same episodes in every round) of a CartPole network heavy enough
//!   that evaluation dominates, with rounds large enough that each of 16
//!   hosts gets 8 tasks a round (the measurement is of distribution, not
//!   of a round's first and last task). `throughput_N` is the evaluator hosts' recorded
//!   results per second of training-round time: from a round's first task
//!   entering the stream to its last result recorded, both read from the
//!   stream entry ids (the server's clock), summed over the rounds after
//!   the first (which pays the hosts' start). The coordinator runs
//!   `--remote-only` (its own worker takes no task: every candidate is
//!   evaluated by the hosts) and is not held to a share. The evolver's
//!   update between rounds is the coordinator's, not the hosts', and is
//!   left out; the solve threshold is out of reach, so no publish gate (one
//!   candidate over 100 episodes, which one host evaluates alone) runs.
//!   Every host is there before the first round (`--min-hosts`).
//!   `scaling_efficiency_16` = `throughput_16 / (16 × throughput_1)`.
//!   A 2-core machine shared with other work may not have the 1.6 CPUs 16
//!   hosts are allowed: so each run also reads the evaluator containers'
//!   CPU time and throttling from their cgroups (v1 `cpuacct`/`cpu`, or v2)
//!   — `evaluator_cpu_ms_per_candidate_N` (CPU spent per result from the
//!   end of the first round to the end of the run, broker work included:
//!   flat if adding hosts adds no work per candidate; the hosts' start —
//!   process, workers, the model fetched — is before it, as for the
//!   throughput),
//!   `throttled_N` (share of CFS periods the quota stopped a container:
//!   near 1 when the share is what limits it, low when the machine is) —
//!   and the load average, `load_N`. `cpu_scaling_efficiency_16` =
//!   `evaluator_cpu_ms_per_candidate_1 / evaluator_cpu_ms_per_candidate_16`.
//! - **Traffic and broker work.** A run of the default CartPole network
//!   (small: its per-generation base costs little) with 4 evaluators:
//!   `bytes_per_candidate` is Redis's `total_net_input_bytes +
//!   total_net_output_bytes` (INFO stats) over the run divided by the
//!   candidates recorded — everything: tasks, results, bases, heartbeats,
//!   blocking reads, lease renewals; `broker_overhead_per_candidate_us` is
//!   the Redis server's CPU time (INFO cpu, user + system, all threads:
//!   commands, scripts, networking, the AOF) over the run per candidate,
//!   and `broker_calls_per_candidate` its commands (INFO stats
//!   `total_commands_processed`). Peer in the same run:
//!   `wire_bytes_per_candidate`, the encoded task share plus result of one
//!   candidate (what must travel at the least).
//!
//! Usage: `bench_dist OUT.json` (env `EVOD_IMAGE`, `EVOD_REDIS_IMAGE`;
//! `EVOD_BENCH_DIST_PARTS=traffic` or `=scaling` runs one part only, e.g.
//! the traffic on a machine that cannot give 16 hosts their share).

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use evod_broker::{Task, TaskResult};

/// Evaluator counts of the scaling runs.
const HOSTS: &[usize] = &[1, 2, 4, 8, 16];
/// CPU share of each evaluator container of the scaling runs: 16 × 0.05 =
/// 0.8 of the 2 cores, with headroom for the coordinator (its ES update
/// between rounds), Redis and the machine.
const CPUS: &str = "0.05";
/// CPU share of each evaluator of the traffic runs (4 hosts; as in the
/// figures before the scaling runs moved to 0.05, so bytes per candidate
/// compare).
const LIGHT_CPUS: &str = "0.1";
/// Guards against hangs only.
const DEADLINE: Duration = Duration::from_secs(1800);
const RUN: &str = "bench";
const STATE: &str = "/var/lib/evod";

/// The scaling runs: a 4-256-256-2 CartPole policy (67 k parameters),
/// 1023 candidates and the ES mean (1024 evaluations a round) of 10
/// episodes in tasks of 8: 128 tasks a round, eight for each of 16 hosts
/// (the last task of a round, which some hosts wait for while one
/// finishes it, is an eighth of a host's round, not a half), about 40 s of
/// one host's round at its 0.05 CPU and 2.6 s of 16 hosts'.
const HEAVY_LAYERS: &str = "4,256,256,2";
const HEAVY_POPULATION: &str = "1023";
const HEAVY_EPISODES: &str = "10";
const HEAVY_GENERATIONS: u64 = 5;
const HEAVY_PER_TASK: &str = "8";
/// Evaluations of a scaling round (population and mean).
const HEAVY_ROUND: u64 = 1024;

/// The traffic runs: the default 4-16-2 policy, 511 candidates and the
/// mean a round, in tasks of 16 (the default: the unsuffixed keys) and of
/// 64 (keys ending `_k64`).
const LIGHT_HOSTS: usize = 4;
const LIGHT_POPULATION: &str = "511";
const LIGHT_GENERATIONS: u64 = 10;
const LIGHT_PER_TASK: &[&str] = &["16", "64"];

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running docker")
}

fn docker_ok(args: &[&str]) -> String {
    let o = docker(args);
    assert!(
        o.status.success(),
        "docker {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One run's containers, volume and network; removed on drop.
struct Bench {
    prefix: String,
    image: String,
    redis_image: String,
    password: String,
    containers: Vec<String>,
    /// Redis's CPU seconds when the coordinator started.
    cpu_at_start: f64,
    /// Each evaluator's CPU seconds and the results recorded when the
    /// first round had all its results (`None`: not sampled).
    after_first_round: Option<(Vec<f64>, u64)>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let mut rm = vec!["rm", "--force", "--volumes"];
        rm.extend(self.containers.iter().map(String::as_str));
        docker(&rm);
        docker(&["volume", "rm", "--force", &self.volume()]);
        docker(&["network", "rm", &self.network()]);
    }
}

impl Bench {
    fn network(&self) -> String {
        format!("{}-net", self.prefix)
    }
    fn volume(&self) -> String {
        format!("{}-coordinator", self.prefix)
    }
    fn redis(&self) -> String {
        format!("{}-redis", self.prefix)
    }
    fn coordinator(&self) -> String {
        format!("{}-coordinator", self.prefix)
    }
    fn key(&self, name: &str) -> String {
        format!("evod:{{{RUN}}}:{name}")
    }

    /// Redis, the coordinator (on a model made by `evod init --layers
    /// LAYERS`) and `hosts` evaluators held to `cpus`, running until the
    /// coordinator's bounded run ends. With `first_round` (its results),
    /// the evaluators' CPU is sampled once the first round is recorded.
    fn run(
        tag: &str,
        hosts: usize,
        layers: Option<&str>,
        evolve: &[&str],
        per_task: &str,
        cpus: &str,
        first_round: Option<u64>,
    ) -> Bench {
        let prefix = format!("evod-bench-dist-{tag}-{}", std::process::id());
        let mut b = Bench {
            image: std::env::var("EVOD_IMAGE").unwrap_or_else(|_| "evod:local".into()),
            redis_image: std::env::var("EVOD_REDIS_IMAGE")
                .unwrap_or_else(|_| "evod-redis:local".into()),
            password: format!("pw-{}", std::process::id()),
            prefix,
            containers: Vec::new(),
            cpu_at_start: 0.0,
            after_first_round: None,
        };
        b.containers.push(b.redis());
        b.containers.push(b.coordinator());
        b.containers
            .extend((1..=hosts).map(|i| format!("{}-evaluator-{i}", b.prefix)));
        docker_ok(&["network", "create", "--internal", &b.network()]);
        docker_ok(&[
            "run",
            "--detach",
            "--name",
            &b.redis(),
            "--network",
            &b.network(),
            "--network-alias",
            "redis",
            &b.redis_image,
            "--dir",
            "/data",
            "--bind",
            "0.0.0.0",
            "--requirepass",
            &b.password,
            "--appendonly",
            "yes",
        ]);
        let ready = Instant::now();
        while b.redis_cli(&["PING"]).trim() != "PONG" {
            assert!(ready.elapsed() < DEADLINE, "Redis did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
        let state = format!("{}:{STATE}", b.volume());
        if let Some(layers) = layers {
            let model = format!("{STATE}/vectorland.gguf");
            docker_ok(&[
                "run", "--rm", "--volume", &state, &b.image, "init", "--layers", layers, "-o",
                &model,
            ]);
        }
        let env = format!("EVOD_BROKER=redis://:{}@redis:6379/0", b.password);
        let dist = [
            "--run-id",
            RUN,
            "--candidates-per-task",
            per_task,
            "--workers",
            "1",
        ];
        // The evaluators first: all are there when the first round is out.
        let network = b.network();
        for i in 1..=hosts {
            let name = format!("{}-evaluator-{i}", b.prefix);
            let host = format!("evaluator-{i}");
            let mut args = vec![
                "run",
                "--detach",
                "--name",
                &name,
                "--network",
                &network,
                "--cpus",
                cpus,
                "--read-only",
                "--tmpfs",
                "/var/lib/evod:uid=65532,gid=65532,mode=0700",
                "--env",
                &env,
                &b.image,
                "join",
                "--host-id",
                &host,
            ];
            args.extend_from_slice(&dist);
            docker_ok(&args);
        }
        b.redis_cli(&["CONFIG", "RESETSTAT"]);
        b.cpu_at_start = b.cpu_seconds();
        let min_hosts = hosts.to_string();
        let coordinator = b.coordinator();
        let mut args = vec![
            "run",
            "--detach",
            "--name",
            &coordinator,
            "--network",
            &network,
            "--read-only",
            "--volume",
            &state,
            "--env",
            &env,
            &b.image,
            "run",
            "--host-id",
            "coordinator",
            "--strategy",
            "es",
            "--seed",
            "5",
            // Out of reach: no publish gate inside the measurement.
            "--solve-threshold",
            "1000000",
            // Evolve once every evaluator is there, and evaluate nothing
            // here: every candidate goes through the broker to a host.
            "--min-hosts",
            &min_hosts,
            "--remote-only",
        ];
        args.extend_from_slice(&dist);
        args.extend_from_slice(evolve);
        docker_ok(&args);
        if let Some(first) = first_round {
            let evaluators: Vec<String> = (1..=hosts)
                .map(|i| format!("{}-evaluator-{i}", b.prefix))
                .collect();
            let ids: Vec<String> = evaluators
                .iter()
                .map(|e| {
                    docker_ok(&["inspect", "--format", "{{.Id}}", e])
                        .trim()
                        .to_owned()
                })
                .collect();
            let results = b.key("results");
            let since = Instant::now();
            loop {
                let n: u64 = b.redis_cli(&["XLEN", &results]).trim().parse().unwrap_or(0);
                if n >= first {
                    // The cgroup files first (microseconds), then the
                    // count again: the results recorded meanwhile are few.
                    let cpu: Option<Vec<f64>> =
                        ids.iter().map(|id| cgroup_cpu(id).map(|c| c.0)).collect();
                    let n: u64 = b.redis_cli(&["XLEN", &results]).trim().parse().unwrap_or(n);
                    b.after_first_round = cpu.map(|c| (c, n));
                    break;
                }
                assert!(since.elapsed() < DEADLINE, "the first round did not end");
                // A poll inside a deadline: nothing to wait on in Redis's CLI.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let code = docker_ok(&["wait", &b.coordinator()]);
        assert_eq!(
            code.trim(),
            "0",
            "the coordinator failed:\n{}",
            String::from_utf8_lossy(&docker(&["logs", "--tail", "30", &b.coordinator()]).stderr)
        );
        b
    }

    fn redis_cli(&self, args: &[&str]) -> String {
        let auth = format!("REDISCLI_AUTH={}", self.password);
        let redis = self.redis();
        let mut all = vec!["exec", "--env", &auth, &redis, "redis-cli", "--raw"];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&docker(&all).stdout).into_owned()
    }

    /// (entry id in ms, field value bytes) of every entry of a stream with
    /// field `field`, read through a Lua script returning hex.
    fn stream(&self, key: &str, field: &str) -> Vec<(u64, Vec<u8>)> {
        const HEX: &str = "local out = {}
            for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+')) do
              for i = 1, #e[2], 2 do
                if e[2][i] == ARGV[1] then
                  out[#out + 1] = e[1] .. ' ' .. (e[2][i + 1]:gsub('.', function(c)
                    return string.format('%02x', string.byte(c)) end))
                end
              end
            end
            return out";
        self.redis_cli(&["EVAL", HEX, "1", &self.key(key), field])
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (id, hex) = l.split_once(' ').expect("id and payload");
                let ms = id.split('-').next().unwrap().parse().expect("ms id");
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                    .collect();
                (ms, bytes)
            })
            .collect()
    }

    /// Redis's CPU time so far (user + system, all threads).
    fn cpu_seconds(&self) -> f64 {
        let cpu = self.info("cpu");
        ["used_cpu_user", "used_cpu_sys"]
            .iter()
            .map(|k| cpu[*k].parse::<f64>().expect("a CPU time"))
            .sum()
    }

    fn info(&self, section: &str) -> BTreeMap<String, String> {
        self.redis_cli(&["INFO", section])
            .lines()
            .filter_map(|l| l.trim().split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }
}

/// CPU seconds a container has used and the share of its CFS periods in
/// which its quota throttled it, from its cgroup (v1 or v2); `None` if
/// neither layout is there.
fn container_cpu(name: &str) -> Option<(f64, f64)> {
    let id = docker_ok(&["inspect", "--format", "{{.Id}}", name]);
    cgroup_cpu(id.trim())
}

/// [`container_cpu`] of the container with this full id.
fn cgroup_cpu(id: &str) -> Option<(f64, f64)> {
    let read = |p: String| std::fs::read_to_string(p).ok();
    let field = |text: &str, key: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
    };
    if let Some(usage) = read(format!("/sys/fs/cgroup/cpuacct/docker/{id}/cpuacct.usage")) {
        let stat = read(format!("/sys/fs/cgroup/cpu/docker/{id}/cpu.stat"))?;
        let periods = field(&stat, "nr_periods ")?.max(1.0);
        let throttled = field(&stat, "nr_throttled ")?;
        return Some((usage.trim().parse::<f64>().ok()? / 1e9, throttled / periods));
    }
    let stat = read(format!(
        "/sys/fs/cgroup/system.slice/docker-{id}.scope/cpu.stat"
    ))?;
    let periods = field(&stat, "nr_periods ")?.max(1.0);
    Some((
        field(&stat, "usage_usec ")? / 1e6,
        field(&stat, "nr_throttled ")? / periods,
    ))
}

/// The 1-minute load average.
fn load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Evaluator results per second of training-round time (rounds after the
/// first), and the rounds measured.
fn throughput(b: &Bench) -> (f64, usize) {
    let tasks = b.stream("tasks", "t");
    let results = b.stream("results", "r");
    let mut start: BTreeMap<u64, u64> = BTreeMap::new();
    for (ms, bytes) in &tasks {
        let t = Task::decode(bytes).expect("a task");
        let s = start.entry(t.generation).or_insert(*ms);
        *s = (*s).min(*ms);
    }
    let mut end: BTreeMap<u64, u64> = BTreeMap::new();
    let mut counted: BTreeMap<u64, u64> = BTreeMap::new();
    let mut size: BTreeMap<u64, u64> = BTreeMap::new();
    for (ms, bytes) in &results {
        let r = TaskResult::decode(bytes).expect("a result");
        let e = end.entry(r.generation).or_insert(*ms);
        *e = (*e).max(*ms);
        *size.entry(r.generation).or_default() += 1;
        if r.host != "coordinator" {
            *counted.entry(r.generation).or_default() += 1;
        }
    }
    // A task's "generation" is its round's id (a hash); training rounds
    // are those of more than one candidate (a gate has one), in the order
    // they were enqueued; the first pays the start.
    let mut training: Vec<(u64, u64)> = start
        .iter()
        .filter(|(r, _)| size.get(r).copied().unwrap_or(0) > 1)
        .map(|(&r, &s)| (s, r))
        .collect();
    training.sort();
    let (mut n, mut ms, mut rounds) = (0u64, 0u64, 0usize);
    for &(s, round) in training.iter().skip(1) {
        n += counted.get(&round).copied().unwrap_or(0);
        ms += end[&round].saturating_sub(s).max(1);
        rounds += 1;
    }
    assert!(rounds > 0, "no training round after the first");
    (n as f64 / (ms as f64 / 1e3), rounds)
}

fn main() {
    let out = std::env::args().nth(1).expect("usage: bench_dist OUT.json");
    let mut json = serde_json::json!({});
    let started = Instant::now();

    let parts = std::env::var("EVOD_BENCH_DIST_PARTS").unwrap_or_else(|_| "traffic,scaling".into());
    let part = |name: &str| parts.split(',').any(|p| p.trim() == name);

    // Traffic and broker work: the small default network.
    for &per_task in LIGHT_PER_TASK.iter().filter(|_| part("traffic")) {
        let suffix = if per_task == "16" {
            String::new()
        } else {
            format!("_k{per_task}")
        };
        let generations = LIGHT_GENERATIONS.to_string();
        let b = Bench::run(
            &format!("traffic{per_task}"),
            LIGHT_HOSTS,
            None,
            &[
                "--population",
                LIGHT_POPULATION,
                "--generations",
                &generations,
            ],
            per_task,
            LIGHT_CPUS,
            None,
        );
        let stats = b.info("stats");
        if std::env::var_os("EVOD_BENCH_DIST_COMMANDS").is_some() {
            // Where the commands go (calls, µs), for a look at the traffic.
            eprintln!("{}", b.redis_cli(&["INFO", "commandstats"]));
        }
        let bytes: f64 = ["total_net_input_bytes", "total_net_output_bytes"]
            .iter()
            .map(|k| stats[*k].parse::<f64>().expect("a byte count"))
            .sum();
        let cpu = b.cpu_seconds() - b.cpu_at_start;
        let calls: f64 = stats["total_commands_processed"]
            .parse()
            .expect("a command count");
        let results = b.stream("results", "r");
        let tasks = b.stream("tasks", "t");
        let candidates = results.len() as f64;
        let task_bytes: usize = tasks.iter().map(|t| t.1.len()).sum();
        let task_candidates: usize = tasks
            .iter()
            .map(|t| Task::decode(&t.1).expect("a task").work.len())
            .sum();
        let result_bytes = results.iter().map(|r| r.1.len()).sum::<usize>() as f64 / candidates;
        let wire = task_bytes as f64 / task_candidates as f64 + result_bytes;
        eprintln!(
            "bench_dist traffic, tasks of {per_task}: {candidates} candidates, {bytes} bytes, \
             {calls} commands, {cpu:.3} s of Redis CPU"
        );
        json[format!("bytes_per_candidate{suffix}")] = (bytes / candidates).into();
        json[format!("wire_bytes_per_candidate{suffix}")] = wire.into();
        json[format!("broker_overhead_per_candidate_us{suffix}")] = (cpu * 1e6 / candidates).into();
        json[format!("broker_calls_per_candidate{suffix}")] = (calls / candidates).into();
        json[format!("traffic_candidates{suffix}")] = candidates.into();
    }
    if part("traffic") {
        json["traffic_evaluators"] = LIGHT_HOSTS.into();
        json["load_traffic"] = load().into();
    }
    if !part("scaling") {
        json["bench_seconds"] = started.elapsed().as_secs().into();
        std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap())
            .expect("writing the report");
        println!("{}", serde_json::to_string_pretty(&json).unwrap());
        return;
    }

    // Scaling.
    let generations = HEAVY_GENERATIONS.to_string();
    let mut t = BTreeMap::new();
    let mut per_cpu = BTreeMap::new();
    // `EVOD_BENCH_DIST_HOSTS=2,4` measures those host counts only (a
    // check of the bench itself; the efficiency needs 1 and 16).
    let host_counts: Vec<usize> = match std::env::var("EVOD_BENCH_DIST_HOSTS") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("EVOD_BENCH_DIST_HOSTS: host counts")
            })
            .collect(),
        Err(_) => HOSTS.to_vec(),
    };
    for &hosts in &host_counts {
        let b = Bench::run(
            &format!("scale{hosts}"),
            hosts,
            Some(HEAVY_LAYERS),
            &[
                "--population",
                HEAVY_POPULATION,
                "--episodes",
                HEAVY_EPISODES,
                "--generations",
                &generations,
            ],
            HEAVY_PER_TASK,
            CPUS,
            Some(HEAVY_ROUND),
        );
        let (rate, rounds) = throughput(&b);
        json[format!("throughput_{hosts}")] = rate.into();
        t.insert(hosts, rate);
        let evaluator_results = b
            .stream("results", "r")
            .iter()
            .filter(|r| TaskResult::decode(&r.1).expect("a result").host != "coordinator")
            .count() as f64;
        let cpu: Option<Vec<(f64, f64)>> = (1..=hosts)
            .map(|i| container_cpu(&format!("{}-evaluator-{i}", b.prefix)))
            .collect();
        let now = load();
        json[format!("load_{hosts}")] = now.into();
        if let (Some(cpu), Some((at_first, results_at_first))) = (cpu, &b.after_first_round) {
            // From the end of the first round: the hosts' start is not in it.
            let seconds: f64 = cpu.iter().map(|c| c.0).sum::<f64>() - at_first.iter().sum::<f64>();
            let throttled = cpu.iter().map(|c| c.1).sum::<f64>() / hosts as f64;
            let per = seconds * 1e3 / (evaluator_results - *results_at_first as f64).max(1.0);
            json[format!("evaluator_cpu_ms_per_candidate_{hosts}")] = per.into();
            json[format!("throttled_{hosts}")] = throttled.into();
            per_cpu.insert(hosts, per);
            eprintln!(
                "bench_dist: {hosts} evaluators: {rate:.1} candidates/s over {rounds} rounds, \
                 {per:.2} CPU ms per candidate, throttled {throttled:.2}, load {now:.1}"
            );
        } else {
            eprintln!(
                "bench_dist: {hosts} evaluators: {rate:.1} candidates/s over {rounds} rounds \
                 (no cgroup CPU figures), load {now:.1}"
            );
        }
    }
    if let (Some(one), Some(sixteen)) = (t.get(&1), t.get(&16)) {
        json["scaling_efficiency_16"] = (sixteen / (16.0 * one)).into();
    }
    if let (Some(one), Some(sixteen)) = (per_cpu.get(&1), per_cpu.get(&16)) {
        json["cpu_scaling_efficiency_16"] = (one / sixteen).into();
    }
    json["evaluator_cpus"] = CPUS.parse::<f64>().unwrap().into();
    json["scaling_layers"] = HEAVY_LAYERS.into();
    json["scaling_population"] = HEAVY_POPULATION.parse::<u64>().unwrap().into();
    json["scaling_episodes"] = HEAVY_EPISODES.parse::<u64>().unwrap().into();
    json["bench_seconds"] = started.elapsed().as_secs().into();
    std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap()).expect("writing the report");
    println!("{}", serde_json::to_string_pretty(&json).unwrap());
}
