//! The Redis Streams engine: [`RedisBroker`] implements both [`Coordinator`]
//! and [`Evaluator`] over one synchronous connection, reopened after any
//! connection error (reported as [`BrokerError::Unavailable`]).
//!
//! Keys live under `evod:{<run>}:` (the braces are a cluster hash tag: a
//! run's keys share a slot, so its scripts may touch several). Everything
//! the protocol needs is on the server, so a Redis restarted from its AOF,
//! or a restarted client, resumes where it was. The layout is in
//! `docs/distributed.md`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use evod_evolve::checksum;
use redis::{Connection, RedisError, Script, Value};

use crate::broker::{
    AckOutcome, Activity, Coordinator, DeadLetter, Delivery, Enqueued, Evaluator, HostInfo, Lease,
    Reclaimed, Retired, Round,
};
use crate::error::{BrokerError, WireError};
use crate::scripts;
use crate::wire::{Task, TaskResult, check_name};

/// A stream entry as `XRANGE` returns it: id and (field, value) pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// The consumer group of a run's evaluators.
pub const GROUP: &str = "evaluators";
/// A host reclaims a task it held itself (released after a failure, or let
/// lapse) only after this many leases idle: other hosts get it first.
pub const OWN_RECLAIM_LEASES: u64 = 3;
/// Time to live of a base chunk until its description is written.
const UNDESCRIBED_CHUNK_TTL: Duration = Duration::from_secs(600);
/// Largest base chunk accepted from the broker.
const MAX_CHUNK: usize = 64 << 20;

/// `url` with the password of its `user:password@` part replaced by `***`,
/// for logs and errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // `redis+unix:///sock?pass=…` (and `password=`): the query's secret.
    if let Some((head, query)) = rest.split_once('?') {
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _))
                    if k.eq_ignore_ascii_case("pass") || k.eq_ignore_ascii_case("password") =>
                {
                    format!("{k}=***")
                }
                _ => kv.to_owned(),
            })
            .collect();
        let head = redact_url(&format!("{scheme}://{head}"));
        return format!("{head}?{}", query.join("&"));
    }
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                format!("{scheme}://***@{host}{path}")
            }
        }
        None => url.to_owned(),
    }
}

/// Settings of a [`RedisBroker`] (its `Debug` hides the URL's password).
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Run id: `[A-Za-z0-9._-]{1,64}`, the key prefix.
    pub run: String,
    /// This process's name: the consumer name of an evaluator (its host
    /// id), the holder name of a coordinator.
    pub consumer: String,
    /// A task idle (not acknowledged or extended) longer than this may be
    /// reclaimed by another evaluator.
    pub task_lease: Duration,
    /// Deliveries after which a task is dead-lettered instead of delivered
    /// again.
    pub max_deliveries: u64,
    /// Approximate bound (`MAXLEN ~`) of each stream; must exceed the tasks
    /// of the generations in flight.
    pub max_stream_len: u64,
    /// Bytes per base chunk.
    pub chunk_bytes: usize,
    /// Largest base accepted by `fetch_base`.
    pub max_base_bytes: usize,
    /// Connect, read and write timeout of one command (blocking reads add
    /// their block time).
    pub io_timeout: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("run", &self.run)
            .field("consumer", &self.consumer)
            .field("task_lease", &self.task_lease)
            .field("max_deliveries", &self.max_deliveries)
            .field("max_stream_len", &self.max_stream_len)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("max_base_bytes", &self.max_base_bytes)
            .field("io_timeout", &self.io_timeout)
            .finish()
    }
}

impl RedisConfig {
    /// Defaults for a run on `url`: 30 s task lease, 3 deliveries, streams
    /// of ~100 000 entries, 512 KiB chunks, bases up to 1 GiB, 2 s I/O
    /// timeout.
    pub fn new(url: &str, run: &str, consumer: &str) -> Self {
        Self {
            url: url.to_owned(),
            run: run.to_owned(),
            consumer: consumer.to_owned(),
            task_lease: Duration::from_secs(30),
            max_deliveries: 3,
            max_stream_len: 100_000,
            chunk_bytes: 512 << 10,
            max_base_bytes: 1 << 30,
            io_timeout: Duration::from_secs(2),
        }
    }
}

/// Key names of one run.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }
    fn tasks(&self) -> String {
        self.key("tasks")
    }
    fn results(&self) -> String {
        self.key("results")
    }
    fn results_of(&self, generation: u64) -> String {
        self.key(&format!("results:{generation}"))
    }
    fn enqueued(&self, generation: u64) -> String {
        self.key(&format!("enqueued:{generation}"))
    }
    fn dead(&self) -> String {
        self.key("dead")
    }
    fn lease(&self) -> String {
        self.key("coordinator")
    }
    fn base(&self, hash: u64) -> String {
        self.key(&format!("base:{hash:016x}"))
    }
    fn chunk(&self, hash: u64, i: usize) -> String {
        self.key(&format!("base:{hash:016x}:{i}"))
    }
    fn model(&self) -> String {
        self.key("model")
    }
    fn setting(&self, name: &str) -> String {
        self.key(&format!("setting:{name}"))
    }
    fn hosts(&self, what: &str) -> String {
        self.key(&format!("hosts:{what}"))
    }
    /// The list that wakes the coordinator (a round complete, a dead
    /// letter): at most one element.
    fn wake(&self) -> String {
        self.key("wake")
    }
    /// The index of enqueued rounds: round id → step.
    fn rounds(&self) -> String {
        self.key("rounds")
    }
    /// The index of published bases: hash (hex) → latest step.
    fn bases(&self) -> String {
        self.key("bases")
    }
}

/// The `ms-seq` parts of a stream entry id.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// A broker on Redis Streams (see the module docs).
pub struct RedisBroker {
    config: RedisConfig,
    client: redis::Client,
    conn: Option<Connection>,
    keys: Keys,
    enqueue: Script,
    ack: Script,
    reclaim: Script,
    extend: Script,
    renew: Script,
    release: Script,
    heartbeat: Script,
    now_ms: Script,
    set_fenced: Script,
    del_fenced: Script,
    retire: Script,
    /// Malformed result entries found (and removed) since the last
    /// [`RedisBroker::take_malformed`].
    malformed: Vec<String>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("config", &self.config)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl RedisBroker {
    /// Checks the configuration; connects lazily, on the first call.
    pub fn new(config: RedisConfig) -> Result<Self, BrokerError> {
        let bad = |m: String| Err(BrokerError::Config(m));
        check_name("config", "run", &config.run).map_err(|e| BrokerError::Config(e.to_string()))?;
        check_name("config", "consumer", &config.consumer)
            .map_err(|e| BrokerError::Config(e.to_string()))?;
        if config.max_deliveries == 0 {
            return bad("max_deliveries must be at least 1".into());
        }
        if config.chunk_bytes == 0
            || config.chunk_bytes > MAX_CHUNK
            || !config.chunk_bytes.is_multiple_of(4)
        {
            return bad(format!(
                "chunk_bytes {} must be a multiple of 4 in 4..={MAX_CHUNK}",
                config.chunk_bytes
            ));
        }
        if config.task_lease < Duration::from_millis(1) || config.io_timeout.is_zero() {
            return bad("task_lease and io_timeout must be positive".into());
        }
        if config.max_stream_len == 0 {
            return bad("max_stream_len must be positive".into());
        }
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| BrokerError::Config(format!("url {:?}: {e}", redact_url(&config.url))))?;
        let keys = Keys {
            prefix: format!("evod:{{{}}}:", config.run),
        };
        Ok(Self {
            config,
            client,
            conn: None,
            keys,
            enqueue: Script::new(scripts::ENQUEUE),
            ack: Script::new(scripts::ACK),
            reclaim: Script::new(scripts::RECLAIM),
            extend: Script::new(scripts::EXTEND),
            renew: Script::new(scripts::RENEW),
            release: Script::new(scripts::RELEASE),
            heartbeat: Script::new(scripts::HEARTBEAT),
            now_ms: Script::new(scripts::NOW_MS),
            set_fenced: Script::new(scripts::SET_FENCED),
            del_fenced: Script::new(scripts::DEL_FENCED),
            retire: Script::new(scripts::RETIRE),
            malformed: Vec::new(),
        })
    }

    /// Malformed result entries [`Coordinator::results`] skipped (and
    /// removed, so that their candidates can be recorded again) since the
    /// last call: one line each, naming the entry and the problem.
    pub fn take_malformed(&mut self) -> Vec<String> {
        std::mem::take(&mut self.malformed)
    }

    /// Deletes `keys` and `member` of the index `index` if `lease` is the
    /// live lease; [`BrokerError::LeaseLost`] otherwise.
    fn del_fenced(
        &mut self,
        op: &'static str,
        lease: &Lease,
        index: String,
        member: String,
        keys: Vec<String>,
    ) -> Result<(), BrokerError> {
        let s = self.del_fenced.clone();
        let mut all = vec![self.keys.lease(), index];
        all.extend(keys);
        let token = lease.token.clone();
        let n: i64 = self.call(op, move |c| {
            s.key(&all[..]).arg(&token).arg(&member).invoke(c)
        })?;
        if n < 0 {
            return Err(BrokerError::LeaseLost {
                holder: lease.token.clone(),
            });
        }
        Ok(())
    }

    /// Records `results` and acknowledges the task (`release_ms` 0) or
    /// leaves it pending with that idle time (a release), atomically.
    fn record(
        &mut self,
        delivery: &Delivery,
        results: &[TaskResult],
        release_ms: u64,
    ) -> Result<AckOutcome, BrokerError> {
        let task = &delivery.task;
        let mismatch = |reason: String| BrokerError::ResultMismatch {
            id: delivery.id.clone(),
            reason,
        };
        let mut payloads = Vec::with_capacity(results.len());
        for r in results {
            if r.run != task.run || r.generation != task.generation {
                return Err(mismatch(format!(
                    "result of run {:?} generation {}, task of run {:?} generation {}",
                    r.run, r.generation, task.run, task.generation
                )));
            }
            if !task.candidates().contains(&r.candidate) {
                return Err(mismatch(format!(
                    "candidate {} not in {:?}",
                    r.candidate,
                    task.candidates()
                )));
            }
            payloads.push((r.candidate, r.encode()?));
        }
        let s = self.ack.clone();
        let keys = [
            self.keys.tasks(),
            self.keys.results(),
            self.keys.results_of(task.generation),
            self.keys.hosts("done"),
            self.keys.enqueued(task.generation),
            self.keys.wake(),
        ];
        let (id, consumer) = (delivery.id.clone(), self.config.consumer.clone());
        let maxlen = self.config.max_stream_len;
        let recorded: i64 = self.call("ack", move |c| {
            let mut inv = s.prepare_invoke();
            inv.key(&keys[..])
                .arg(GROUP)
                .arg(&id)
                .arg(&consumer)
                .arg(maxlen)
                .arg(release_ms);
            for (cand, p) in &payloads {
                inv.arg(*cand).arg(p.as_slice());
            }
            inv.invoke(c)
        })?;
        let recorded = recorded.max(0) as usize;
        Ok(AckOutcome {
            recorded,
            duplicates: results.len().saturating_sub(recorded),
        })
    }

    /// Forgets the hosts whose last heartbeat is older than `gone` (their
    /// worker count, results count and last-seen time); returns them.
    pub fn prune_hosts(&mut self, gone: Duration) -> Result<Vec<String>, BrokerError> {
        let now = self.server_ms()?;
        let seen_key = self.keys.hosts("seen");
        let k = seen_key.clone();
        let seen: Vec<(String, u64)> = self.call("list hosts", move |c| {
            redis::cmd("HGETALL").arg(&k).query(c)
        })?;
        let old: Vec<String> = seen
            .into_iter()
            .filter(|(_, t)| now.saturating_sub(*t) > gone.as_millis() as u64)
            .map(|(h, _)| h)
            .collect();
        if old.is_empty() {
            return Ok(old);
        }
        let keys = [
            self.keys.hosts("workers"),
            self.keys.hosts("done"),
            seen_key,
        ];
        let hosts = old.clone();
        self.call("prune hosts", move |c| {
            let mut p = redis::pipe();
            p.atomic();
            for k in &keys {
                p.cmd("HDEL").arg(k).arg(&hosts).ignore();
            }
            p.query::<()>(c)
        })?;
        Ok(old)
    }

    /// Stores one of the coordinator's run settings (e.g. its evaluation
    /// timeout, which the hosts use), fenced by the lease.
    pub fn publish_run_setting(
        &mut self,
        lease: &Lease,
        name: &str,
        value: &str,
    ) -> Result<(), BrokerError> {
        let (s, keys) = (
            self.set_fenced.clone(),
            [self.keys.lease(), self.keys.setting(name)],
        );
        let token = lease.token.clone();
        let ok: i64 = self.call("publish a run setting", move |c| {
            s.key(&keys[..]).arg(&token).arg(value).invoke(c)
        })?;
        if ok == 1 {
            Ok(())
        } else {
            Err(BrokerError::LeaseLost {
                holder: lease.token.clone(),
            })
        }
    }

    /// A run setting the coordinator published (`None`: not yet).
    pub fn fetch_run_setting(&mut self, name: &str) -> Result<Option<String>, BrokerError> {
        let key = self.keys.setting(name);
        self.call("fetch a run setting", move |c| {
            redis::cmd("GET").arg(&key).query(c)
        })
    }

    /// Several run settings in one round trip (`MGET`), in order.
    pub fn fetch_run_settings(
        &mut self,
        names: &[&str],
    ) -> Result<Vec<Option<String>>, BrokerError> {
        let keys: Vec<String> = names.iter().map(|n| self.keys.setting(n)).collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.call("fetch run settings", move |c| {
            redis::cmd("MGET").arg(&keys).query(c)
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// The key prefix of this run (`evod:{<run>}:`).
    pub fn prefix(&self) -> &str {
        &self.keys.prefix
    }

    /// Largest model file [`Coordinator::publish_model`] stores and
    /// [`Evaluator::fetch_model`] accepts: a base plus 64 MiB of header.
    fn max_model_bytes(&self) -> usize {
        self.config.max_base_bytes.saturating_add(64 << 20)
    }

    /// Checks the broker answers (`PING`).
    pub fn ping(&mut self) -> Result<(), BrokerError> {
        self.call("ping", |c| redis::cmd("PING").query::<String>(c))
            .map(drop)
    }

    /// Runs `f` on the connection (opened if needed), with a read timeout of
    /// `io_timeout + extra`. A connection-level error drops the connection
    /// and is [`BrokerError::Unavailable`].
    fn call_with<T>(
        &mut self,
        op: &'static str,
        extra: Duration,
        f: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, BrokerError> {
        if self.conn.is_none() {
            let t = self.config.io_timeout;
            let conn = self
                .client
                .get_connection_with_timeout(t)
                .and_then(|c| {
                    c.set_write_timeout(Some(t))?;
                    Ok(c)
                })
                .map_err(|e| self.classify(op, e))?;
            self.conn = Some(conn);
        }
        let conn = self.conn.as_mut().expect("connected above");
        let result = conn
            .set_read_timeout(Some(self.config.io_timeout + extra))
            .and_then(|()| f(conn));
        result.map_err(|e| self.classify(op, e))
    }

    fn call<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut Connection) -> Result<T, RedisError>,
    ) -> Result<T, BrokerError> {
        self.call_with(op, Duration::ZERO, f)
    }

    /// Connection trouble (and a server still loading its AOF) is
    /// `Unavailable`, and drops the connection; the rest is `Server`.
    fn classify(&mut self, op: &'static str, e: RedisError) -> BrokerError {
        let transient = e.is_io_error()
            || e.is_connection_refusal()
            || e.is_connection_dropped()
            || e.is_timeout()
            || matches!(e.code(), Some("LOADING" | "MASTERDOWN" | "TRYAGAIN"));
        if transient {
            self.conn = None;
            BrokerError::Unavailable {
                op,
                reason: format!("{} ({e})", redact_url(&self.config.url)),
            }
        } else {
            BrokerError::Server {
                op,
                reason: e.to_string(),
            }
        }
    }

    fn check_run(&self, run: &str) -> Result<(), BrokerError> {
        if run == self.config.run {
            Ok(())
        } else {
            Err(BrokerError::WrongRun {
                got: run.to_owned(),
                want: self.config.run.clone(),
            })
        }
    }

    /// Creates the run's consumer group (and the stream) if missing.
    fn ensure_group(&mut self) -> Result<(), BrokerError> {
        let tasks = self.keys.tasks();
        let r = self.call("create group", |c| {
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&tasks)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query::<()>(c)
        });
        match r {
            Err(BrokerError::Server { reason, .. }) if reason.contains("BUSYGROUP") => Ok(()),
            other => other,
        }
    }

    /// Decodes a delivered payload; a task that is malformed or of another
    /// run is moved to the dead-letter stream (and acknowledged) with the
    /// reason, never handed out.
    fn accept(
        &mut self,
        id: String,
        payload: &[u8],
        deliveries: u64,
    ) -> Result<Option<Delivery>, BrokerError> {
        let refused = match Task::decode(payload) {
            Ok(task) if task.run == self.config.run => {
                return Ok(Some(Delivery {
                    id,
                    task,
                    deliveries,
                }));
            }
            Ok(task) => format!("task of run {:?}", task.run),
            Err(e) => e.to_string(),
        };
        self.dead_letter(&id, payload, deliveries, &refused)?;
        Ok(None)
    }

    /// Moves a delivered task to the dead-letter stream with `why` and
    /// acknowledges it, atomically.
    fn dead_letter(
        &mut self,
        id: &str,
        payload: &[u8],
        deliveries: u64,
        why: &str,
    ) -> Result<(), BrokerError> {
        let (tasks, dead, wake) = (self.keys.tasks(), self.keys.dead(), self.keys.wake());
        let (maxlen, consumer) = (self.config.max_stream_len, self.config.consumer.clone());
        self.call("dead-letter a task", |c| {
            redis::pipe()
                .atomic()
                .cmd("XADD")
                .arg(&dead)
                .arg("MAXLEN")
                .arg("~")
                .arg(maxlen)
                .arg("*")
                .arg("t")
                .arg(payload)
                .arg("id")
                .arg(id)
                .arg("n")
                .arg(deliveries)
                .arg("c")
                .arg(&consumer)
                .arg("why")
                .arg(why)
                .ignore()
                .cmd("XACK")
                .arg(&tasks)
                .arg(GROUP)
                .arg(id)
                .ignore()
                .cmd("RPUSH")
                .arg(&wake)
                .arg("1")
                .ignore()
                .cmd("LTRIM")
                .arg(&wake)
                .arg(-1)
                .arg(-1)
                .ignore()
                .query::<()>(c)
        })
    }

    /// The enqueue script: once per round unless `force`.
    fn add_tasks(
        &mut self,
        lease: &Lease,
        round: Round,
        tasks: &[Task],
        force: bool,
    ) -> Result<usize, BrokerError> {
        let mut payloads = Vec::with_capacity(tasks.len());
        let mut candidates = 0u64;
        for t in tasks {
            self.check_run(&t.run)?;
            if t.generation != round.id {
                return Err(BrokerError::Config(format!(
                    "task of generation {} enqueued as generation {}",
                    t.generation, round.id
                )));
            }
            candidates += t.work.len() as u64;
            payloads.push(t.encode()?);
        }
        let s = self.enqueue.clone();
        let keys = [
            self.keys.lease(),
            self.keys.tasks(),
            self.keys.enqueued(round.id),
            self.keys.rounds(),
        ];
        let (token, maxlen) = (lease.token.clone(), self.config.max_stream_len);
        let n: i64 = self.call("enqueue", move |c| {
            let mut inv = s.prepare_invoke();
            inv.key(&keys[..])
                .arg(&token)
                .arg(GROUP)
                .arg(maxlen)
                .arg(u8::from(force))
                .arg(round.id)
                .arg(round.step)
                .arg(candidates);
            for p in &payloads {
                inv.arg(p.as_slice());
            }
            inv.invoke(c)
        })?;
        if n < 0 {
            return Err(BrokerError::LeaseLost {
                holder: lease.token.clone(),
            });
        }
        Ok(n as usize)
    }

    /// A base's keys: its description and, as it says, its chunks (a
    /// description that is missing or out of bounds: itself only; its
    /// undescribed chunks expire by themselves).
    fn base_keys(&mut self, hash: u64) -> Result<Vec<String>, BrokerError> {
        let meta = self.keys.base(hash);
        let m = meta.clone();
        let desc: Vec<(String, String)> =
            self.call("drop base", move |c| redis::cmd("HGETALL").arg(&m).query(c))?;
        let get = |f: &str| {
            desc.iter()
                .find(|(k, _)| k == f)
                .and_then(|(_, v)| v.parse::<u64>().ok())
        };
        let mut keys = vec![meta];
        if let (Some(bytes), Some(chunk)) = (get("bytes"), get("chunk"))
            && chunk > 0
            && bytes <= self.config.max_base_bytes as u64
        {
            keys.extend((0..bytes.div_ceil(chunk) as usize).map(|i| self.keys.chunk(hash, i)));
        }
        Ok(keys)
    }

    fn server_ms(&mut self) -> Result<u64, BrokerError> {
        let s = self.now_ms.clone();
        self.call("time", move |c| s.invoke::<u64>(c))
    }
}

impl Coordinator for RedisBroker {
    fn acquire_lease(
        &mut self,
        holder: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Lease, BrokerError> {
        check_name("lease", "holder", holder).map_err(|e| BrokerError::Config(e.to_string()))?;
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let token = format!("{holder}/{}/{nanos}", std::process::id());
        let key = self.keys.lease();
        let deadline = Instant::now() + wait;
        loop {
            let (k, t) = (key.clone(), token.clone());
            let got: Option<String> = self.call("acquire lease", move |c| {
                redis::cmd("SET")
                    .arg(&k)
                    .arg(&t)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query(c)
            })?;
            if got.is_some() {
                return Ok(Lease { token, ttl });
            }
            let k = key.clone();
            let (holder, pttl): (Option<String>, i64) = self.call("read lease", move |c| {
                redis::pipe()
                    .cmd("GET")
                    .arg(&k)
                    .cmd("PTTL")
                    .arg(&k)
                    .query(c)
            })?;
            let remaining = Duration::from_millis(pttl.max(0) as u64);
            let now = Instant::now();
            if now >= deadline {
                return Err(BrokerError::LeaseHeld {
                    holder: holder.unwrap_or_default(),
                    remaining,
                });
            }
            // Poll a few times per lease period: a lapse is noticed within
            // a quarter of the ttl.
            let step = (ttl / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
            std::thread::sleep(
                step.min(remaining.max(Duration::from_millis(1)))
                    .min(deadline - now),
            );
        }
    }

    fn renew_lease(&mut self, lease: &Lease) -> Result<bool, BrokerError> {
        let (s, k) = (self.renew.clone(), self.keys.lease());
        let ttl_ms = lease.ttl.as_millis().max(1) as u64;
        let token = lease.token.clone();
        let ok: i64 = self.call("renew lease", move |c| {
            s.key(&k).arg(&token).arg(ttl_ms).invoke(c)
        })?;
        if ok == 1 || ok == 2 {
            Ok(ok == 2)
        } else {
            Err(BrokerError::LeaseLost {
                holder: lease.token.clone(),
            })
        }
    }

    fn release_lease(&mut self, lease: &Lease) -> Result<(), BrokerError> {
        let (s, k, token) = (self.release.clone(), self.keys.lease(), lease.token.clone());
        self.call("release lease", move |c| {
            s.key(&k).arg(&token).invoke::<i64>(c)
        })
        .map(drop)
    }

    fn publish_base(&mut self, step: u64, params: &[f32]) -> Result<u64, BrokerError> {
        let hash = checksum(params);
        let meta = self.keys.base(hash);
        let index = self.keys.bases();
        let member = format!("{hash:016x}");
        let (m, i, mb) = (meta.clone(), index.clone(), member.clone());
        // Indexed (under the latest step that uses it) in the same step as
        // the existence check: an existing base is indexed too.
        let (exists,): (bool,) = self.call("publish base", move |c| {
            redis::pipe()
                .cmd("EXISTS")
                .arg(&m)
                .cmd("ZADD")
                .arg(&i)
                .arg("GT")
                .arg(step)
                .arg(&mb)
                .ignore()
                .query(c)
        })?;
        if exists {
            return Ok(hash);
        }
        let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
        let chunk = self.config.chunk_bytes;
        let mut keys = Vec::new();
        for (i, part) in bytes.chunks(chunk).enumerate() {
            let key = self.keys.chunk(hash, i);
            keys.push(key.clone());
            // With a time to live until the description exists: the
            // chunks of a publish cut short (a coordinator killed) go by
            // themselves.
            self.call("publish base chunk", move |c| {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(part)
                    .arg("PX")
                    .arg(UNDESCRIBED_CHUNK_TTL.as_millis() as u64)
                    .query::<()>(c)
            })?;
        }
        // The description goes last, in one transaction with making the
        // chunks permanent: a base is visible only when whole, and a whole
        // base never loses a chunk.
        let len = bytes.len();
        self.call("publish base", move |c| {
            let mut p = redis::pipe();
            p.atomic();
            for k in &keys {
                p.cmd("PERSIST").arg(k).ignore();
            }
            p.cmd("HSET")
                .arg(&meta)
                .arg("bytes")
                .arg(len)
                .arg("chunk")
                .arg(chunk)
                .ignore();
            p.query::<()>(c)
        })?;
        Ok(hash)
    }

    fn drop_base(&mut self, lease: &Lease, hash: u64) -> Result<(), BrokerError> {
        let keys = self.base_keys(hash)?;
        let (index, member) = (self.keys.bases(), format!("{hash:016x}"));
        self.del_fenced("drop base", lease, index, member, keys)
    }

    fn bases(&mut self) -> Result<Vec<(u64, u64)>, BrokerError> {
        let index = self.keys.bases();
        let raw: Vec<(String, f64)> = self.call("list bases", move |c| {
            redis::cmd("ZRANGE")
                .arg(&index)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(c)
        })?;
        // A member that is not a hash is not ours: skipped.
        Ok(raw
            .into_iter()
            .filter_map(|(h, step)| Some((u64::from_str_radix(&h, 16).ok()?, step as u64)))
            .collect())
    }

    fn publish_model(&mut self, lease: &Lease, model: &[u8]) -> Result<(), BrokerError> {
        if model.len() > self.max_model_bytes() {
            return Err(BrokerError::Config(format!(
                "model file of {} bytes is larger than {} bytes",
                model.len(),
                self.max_model_bytes()
            )));
        }
        let (s, keys) = (
            self.set_fenced.clone(),
            [self.keys.lease(), self.keys.model()],
        );
        let token = lease.token.clone();
        let ok: i64 = self.call("publish model", move |c| {
            s.key(&keys[..]).arg(&token).arg(model).invoke(c)
        })?;
        if ok == 1 {
            Ok(())
        } else {
            Err(BrokerError::LeaseLost {
                holder: lease.token.clone(),
            })
        }
    }

    fn enqueue(
        &mut self,
        lease: &Lease,
        round: Round,
        tasks: &[Task],
    ) -> Result<Enqueued, BrokerError> {
        match self.add_tasks(lease, round, tasks, false)? {
            0 if !tasks.is_empty() => Ok(Enqueued::Already),
            n => Ok(Enqueued::New(n)),
        }
    }

    fn requeue(
        &mut self,
        lease: &Lease,
        round: Round,
        tasks: &[Task],
    ) -> Result<usize, BrokerError> {
        self.add_tasks(lease, round, tasks, true)
    }

    fn missing(
        &mut self,
        generation: u64,
        candidates: std::ops::Range<u32>,
    ) -> Result<Vec<u32>, BrokerError> {
        let key = self.keys.results_of(generation);
        let have: Vec<String> = self.call("read results", move |c| {
            redis::cmd("HKEYS").arg(&key).query(c)
        })?;
        let have: std::collections::HashSet<u32> =
            have.iter().filter_map(|f| f.parse().ok()).collect();
        Ok(candidates.filter(|c| !have.contains(c)).collect())
    }

    fn results(&mut self, generation: u64) -> Result<Vec<TaskResult>, BrokerError> {
        let key = self.keys.results_of(generation);
        let raw: Vec<(Vec<u8>, Vec<u8>)> = self.call("read results", move |c| {
            redis::cmd("HGETALL").arg(&key).query(c)
        })?;
        let mut out = Vec::with_capacity(raw.len());
        let mut bad = Vec::new();
        for (field, value) in raw {
            let name = String::from_utf8_lossy(&field).into_owned();
            let checked =
                stored_result(&name, &value).map(|(candidate, fitness, host)| TaskResult {
                    run: self.config.run.clone(),
                    generation,
                    candidate,
                    fitness,
                    host,
                });
            match checked {
                Ok(r) => out.push(r),
                Err(why) => {
                    self.malformed.push(format!(
                        "result entry {name:?} of generation {generation:016x}: {why}; removed, its candidate counts as missing"
                    ));
                    bad.push(field);
                }
            }
        }
        if !bad.is_empty() {
            // Removed so that another delivery can record the candidate.
            let key = self.keys.results_of(generation);
            self.call("remove malformed results", move |c| {
                redis::cmd("HDEL").arg(&key).arg(&bad).query::<()>(c)
            })?;
        }
        out.sort_by_key(|r| r.candidate);
        Ok(out)
    }

    fn wait_results(
        &mut self,
        generation: u64,
        want: usize,
        timeout: Duration,
    ) -> Result<Vec<TaskResult>, BrokerError> {
        self.wait_count(generation, want, timeout)?;
        self.results(generation)
    }

    fn wait_count(
        &mut self,
        generation: u64,
        want: usize,
        timeout: Duration,
    ) -> Result<usize, BrokerError> {
        let deadline = Instant::now() + timeout;
        let key = self.keys.results_of(generation);
        let wake = self.keys.wake();
        loop {
            // Count, then wait for a wake: a round completed (or a letter
            // dead) after the count pushes one, so none is missed; one
            // pushed before it (already counted) costs a spurious wake.
            let k = key.clone();
            let count: usize =
                self.call("wait results", move |c| redis::cmd("HLEN").arg(&k).query(c))?;
            let now = Instant::now();
            if count >= want || now >= deadline {
                return Ok(count);
            }
            let block = (deadline - now).min(Duration::from_secs(5));
            let w = wake.clone();
            self.call_with("wait results", block, move |c| {
                redis::cmd("BLPOP")
                    .arg(&w)
                    .arg(format!("{:.3}", block.as_secs_f64().max(0.001)))
                    .query::<Value>(c)
            })?;
        }
    }

    fn activity(&mut self, window: Duration) -> Result<Activity, BrokerError> {
        /// Pending entries looked at; past it, the rest count as live.
        const MAX_LISTED: usize = 10_000;
        let tasks = self.keys.tasks();
        let t = tasks.clone();
        let pending = self.call("task activity", move |c| {
            redis::cmd("XPENDING")
                .arg(&t)
                .arg(GROUP)
                .arg("-")
                .arg("+")
                .arg(MAX_LISTED)
                .query::<Vec<(String, String, u64, u64)>>(c)
        });
        let pending = match pending {
            Ok(p) => p,
            // No stream or group yet (or any more): nothing anywhere.
            Err(BrokerError::Server { reason, .. })
                if reason.contains("NOGROUP") || reason.contains("no such key") =>
            {
                return Ok(Activity::default());
            }
            Err(e) => return Err(e),
        };
        let window_ms = window.as_millis() as u64;
        let mut activity = Activity::default();
        for (_, _, idle_ms, _) in &pending {
            if *idle_ms < window_ms {
                activity.live += 1;
            } else {
                activity.stale += 1;
            }
        }
        if pending.len() >= MAX_LISTED {
            activity.live += 1;
        }
        let groups: Value = self.call("task activity", move |c| {
            redis::cmd("XINFO").arg("GROUPS").arg(&tasks).query(c)
        })?;
        activity.waiting = group_lag(groups);
        Ok(activity)
    }

    fn dead_letters(&mut self) -> Result<Vec<DeadLetter>, BrokerError> {
        self.dead_letters_after("0-0")
    }

    fn dead_letters_after(&mut self, after: &str) -> Result<Vec<DeadLetter>, BrokerError> {
        let key = self.keys.dead();
        // Exclusive start: the letters after `after`.
        let start = format!("({after}");
        let raw: Vec<StreamEntry> = self.call("read dead letters", move |c| {
            redis::cmd("XRANGE").arg(&key).arg(&start).arg("+").query(c)
        })?;
        let mut out = Vec::with_capacity(raw.len());
        for (id, fields) in raw {
            let get = |f: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == f)
                    .map(|(_, v)| v.as_slice())
            };
            // A malformed letter is reported as such (its task an error),
            // never a failure of the whole read.
            let task = match get("t") {
                Some(t) => Task::decode(t),
                None => Err(WireError::Entry {
                    what: "dead letter",
                    reason: format!("{id} has no field \"t\""),
                }),
            };
            let deliveries = get("n")
                .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
                .unwrap_or(0);
            let last_consumer = get("c").map_or_else(
                || "?".to_owned(),
                |c| String::from_utf8_lossy(c).into_owned(),
            );
            let why = get("why").map(|w| String::from_utf8_lossy(w).into_owned());
            out.push(DeadLetter {
                id,
                task,
                deliveries,
                last_consumer,
                why,
            });
        }
        Ok(out)
    }

    fn retire(
        &mut self,
        lease: &Lease,
        before: u64,
        dead_read: &str,
    ) -> Result<Retired, BrokerError> {
        if parse_id(dead_read).is_none() {
            return Err(BrokerError::Config(format!(
                "dead letter id {dead_read:?} is not a stream id"
            )));
        }
        let index = self.keys.rounds();
        let rounds: Vec<(String, f64)> = self.call("retire rounds", move |c| {
            redis::cmd("ZRANGE")
                .arg(&index)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(c)
        })?;
        let (old, live): (Vec<_>, Vec<_>) = rounds
            .into_iter()
            .partition(|(_, step)| (*step as u64) < before);
        let old: Vec<String> = old.into_iter().map(|(r, _)| r).collect();
        // Where the tasks of the oldest live round start: everything
        // before is of retired rounds. A live round whose mark is gone or
        // unreadable keeps everything.
        let mut minid = String::new();
        if !live.is_empty() {
            let marks: Vec<String> = live
                .iter()
                .map(|(r, _)| self.keys.key(&format!("enqueued:{r}")))
                .collect();
            let values: Vec<Option<String>> = self.call("retire rounds", move |c| {
                redis::cmd("MGET").arg(&marks).query(c)
            })?;
            let firsts: Option<Vec<(u64, u64)>> = values
                .iter()
                .map(|v| parse_id(v.as_deref()?.split(' ').next()?))
                .collect();
            let (ms, seq) = firsts.and_then(|f| f.into_iter().min()).unwrap_or((0, 0));
            minid = format!("{ms}-{seq}");
        }
        let bases: Vec<u64> = self
            .bases()?
            .into_iter()
            .filter(|(_, step)| *step < before)
            .map(|(h, _)| h)
            .collect();
        let mut keys = vec![
            self.keys.lease(),
            self.keys.rounds(),
            self.keys.bases(),
            self.keys.tasks(),
            self.keys.dead(),
        ];
        for r in &old {
            keys.push(self.keys.key(&format!("results:{r}")));
            keys.push(self.keys.key(&format!("enqueued:{r}")));
        }
        for &h in &bases {
            keys.extend(self.base_keys(h)?);
        }
        let mut args: Vec<Vec<u8>> = vec![
            lease.token.clone().into_bytes(),
            GROUP.as_bytes().to_vec(),
            minid.into_bytes(),
            dead_read.as_bytes().to_vec(),
            old.len().to_string().into_bytes(),
            bases.len().to_string().into_bytes(),
        ];
        args.extend(old.iter().map(|r| r.clone().into_bytes()));
        args.extend(bases.iter().map(|h| format!("{h:016x}").into_bytes()));
        // The live rounds as a task carries them (its `generation`), to
        // tell which dead letters are still needed.
        args.extend(
            live.iter()
                .filter_map(|(r, _)| r.parse::<u64>().ok())
                .map(|r| r.to_le_bytes().to_vec()),
        );
        let s = self.retire.clone();
        let reply: Value = self.call("retire rounds", move |c| {
            s.key(&keys[..]).arg(&args[..]).invoke(c)
        })?;
        let counts: Vec<i64> = match reply {
            Value::Int(-1) => {
                return Err(BrokerError::LeaseLost {
                    holder: lease.token.clone(),
                });
            }
            Value::Array(v) => v
                .into_iter()
                .map(|x| match x {
                    Value::Int(n) => n,
                    _ => 0,
                })
                .collect(),
            _ => Vec::new(),
        };
        let at = |i: usize| counts.get(i).copied().unwrap_or(0).max(0) as usize;
        Ok(Retired {
            rounds: old.len(),
            bases: bases.len(),
            keys: at(0),
            pending: at(1),
            dead: at(2),
        })
    }

    fn hosts(&mut self) -> Result<Vec<HostInfo>, BrokerError> {
        let now = self.server_ms()?;
        let keys = [
            self.keys.hosts("workers"),
            self.keys.hosts("done"),
            self.keys.hosts("seen"),
        ];
        type Table = Vec<(String, u64)>;
        let (workers, done, seen): (Table, Table, Table) = self.call("list hosts", move |c| {
            redis::pipe()
                .cmd("HGETALL")
                .arg(&keys[0])
                .cmd("HGETALL")
                .arg(&keys[1])
                .cmd("HGETALL")
                .arg(&keys[2])
                .query(c)
        })?;
        let find = |t: &Table, h: &str| t.iter().find(|(k, _)| k == h).map_or(0, |(_, v)| *v);
        let mut out: Vec<HostInfo> = workers
            .iter()
            .map(|(host, w)| HostInfo {
                host: host.clone(),
                workers: (*w).min(u64::from(u32::MAX)) as u32,
                tasks_done: find(&done, host),
                last_seen: Duration::from_millis(now.saturating_sub(find(&seen, host))),
            })
            .collect();
        out.sort_by(|a, b| a.host.cmp(&b.host));
        Ok(out)
    }
}

/// The `lag` (entries not yet delivered) of the evaluators' group in an
/// `XINFO GROUPS` reply; 0 when the server does not know it (a trimmed
/// stream) or the group is missing.
fn group_lag(groups: Value) -> u64 {
    let Value::Array(groups) = groups else {
        return 0;
    };
    for g in groups {
        let pairs: Vec<(Value, Value)> = match g {
            Value::Array(flat) => {
                let mut it = flat.into_iter();
                std::iter::from_fn(|| Some((it.next()?, it.next()?))).collect()
            }
            Value::Map(m) => m,
            _ => continue,
        };
        let field = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| text(k.clone()).as_deref() == Some(name))
                .map(|(_, v)| v.clone())
        };
        if field("name").and_then(text).as_deref() == Some(GROUP) {
            return match field("lag") {
                Some(Value::Int(n)) => n.max(0) as u64,
                _ => 0,
            };
        }
    }
    0
}

/// A results hash entry as the ack script stores it: field = the
/// candidate, value = `u8 version | f64 fitness | host` (the run and round
/// are the key's). Checked like bytes from a worker: the version, a
/// fitness that is a number, a host name `[A-Za-z0-9._-]{1,64}`.
fn stored_result(field: &str, value: &[u8]) -> Result<(u32, f64, String), String> {
    let candidate: u32 = field
        .parse()
        .map_err(|_| "its field is not a candidate index".to_owned())?;
    let (&version, rest) = value
        .split_first()
        .ok_or_else(|| "it is empty".to_owned())?;
    if version != crate::wire::WIRE_VERSION {
        return Err(format!(
            "version {version}, this build reads {}",
            crate::wire::WIRE_VERSION
        ));
    }
    if rest.len() < 9 {
        return Err(format!("{} bytes: no fitness and host", value.len()));
    }
    let fitness = f64::from_le_bytes(rest[..8].try_into().expect("8 bytes"));
    if fitness.is_nan() {
        return Err("its fitness is NaN".into());
    }
    let host = std::str::from_utf8(&rest[8..]).map_err(|_| "its host is not utf-8".to_owned())?;
    check_name("result", "host", host).map_err(|e| e.to_string())?;
    Ok((candidate, fitness, host.to_owned()))
}

/// Parses `[[id, [field, value, …]], …]` entries of a stream reply.
fn entries(v: Value) -> Result<Vec<(String, Vec<u8>)>, WireError> {
    let bad = |reason: &str| WireError::Entry {
        what: "task",
        reason: reason.to_owned(),
    };
    let Value::Array(items) = v else {
        return Err(bad("stream reply is not an array"));
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else {
            return Err(bad("entry is not an array"));
        };
        if pair.len() != 2 {
            return Err(bad("entry is not [id, fields]"));
        }
        let fields = pair.pop().expect("two");
        let id = text(pair.pop().expect("two")).ok_or_else(|| bad("entry id is not text"))?;
        let Value::Array(fields) = fields else {
            // A trimmed entry still pending: no fields. Report it empty.
            out.push((id, Vec::new()));
            continue;
        };
        let payload = fields
            .chunks(2)
            .find(|kv| kv.len() == 2 && text(kv[0].clone()).as_deref() == Some("t"))
            .and_then(|kv| match &kv[1] {
                Value::BulkString(b) => Some(b.clone()),
                _ => None,
            })
            .unwrap_or_default();
        out.push((id, payload));
    }
    Ok(out)
}

fn text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

impl Evaluator for RedisBroker {
    fn heartbeat(&mut self, workers: u32) -> Result<(), BrokerError> {
        let s = self.heartbeat.clone();
        let keys = [self.keys.hosts("workers"), self.keys.hosts("seen")];
        let host = self.config.consumer.clone();
        self.call("heartbeat", move |c| {
            s.key(&keys[..]).arg(&host).arg(workers).invoke::<i64>(c)
        })
        .map(drop)
    }

    fn fetch_model(&mut self) -> Result<Option<Vec<u8>>, BrokerError> {
        let key = self.keys.model();
        let k = key.clone();
        let len: usize = self.call("fetch model", move |c| {
            redis::cmd("STRLEN").arg(&k).query(c)
        })?;
        if len > self.max_model_bytes() {
            return Err(BrokerError::Config(format!(
                "the run's model file on the broker is {len} bytes, more than {} (max_base_bytes + 64 MiB)",
                self.max_model_bytes()
            )));
        }
        self.call("fetch model", move |c| redis::cmd("GET").arg(&key).query(c))
    }

    fn refuse(&mut self, delivery: &Delivery, why: &str) -> Result<(), BrokerError> {
        let payload = delivery.task.encode()?;
        self.dead_letter(&delivery.id, &payload, delivery.deliveries, why)
    }

    fn outstanding(
        &mut self,
        generation: u64,
        candidates: std::ops::Range<u32>,
    ) -> Result<Option<Vec<u32>>, BrokerError> {
        let keys = [
            self.keys.enqueued(generation),
            self.keys.results_of(generation),
        ];
        let (open, have): (bool, Vec<String>) = self.call("read a round", move |c| {
            redis::pipe()
                .cmd("EXISTS")
                .arg(&keys[0])
                .cmd("HKEYS")
                .arg(&keys[1])
                .query(c)
        })?;
        if !open {
            return Ok(None);
        }
        let have: std::collections::HashSet<u32> =
            have.iter().filter_map(|f| f.parse().ok()).collect();
        Ok(Some(candidates.filter(|c| !have.contains(c)).collect()))
    }

    fn fetch_base(&mut self, hash: u64) -> Result<Vec<f32>, BrokerError> {
        let meta = self.keys.base(hash);
        let desc: Vec<(String, String)> = self.call("fetch base", move |c| {
            redis::cmd("HGETALL").arg(&meta).query(c)
        })?;
        if desc.is_empty() {
            return Err(BrokerError::BaseMissing { hash });
        }
        let bad = |reason: String| BrokerError::BadBase { hash, reason };
        let get = |f: &str| {
            desc.iter()
                .find(|(k, _)| k == f)
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .ok_or_else(|| bad(format!("description has no numeric {f:?}")))
        };
        let (bytes, chunk) = (get("bytes")?, get("chunk")?);
        if bytes == 0 || bytes % 4 != 0 || bytes > self.config.max_base_bytes {
            return Err(bad(format!(
                "{bytes} bytes: not a positive multiple of 4 up to {}",
                self.config.max_base_bytes
            )));
        }
        if chunk == 0 || chunk > MAX_CHUNK {
            return Err(bad(format!("chunk size {chunk} not in 1..={MAX_CHUNK}")));
        }
        let mut data = Vec::with_capacity(bytes);
        for i in 0..bytes.div_ceil(chunk) {
            let key = self.keys.chunk(hash, i);
            let part: Option<Vec<u8>> = self.call("fetch base chunk", move |c| {
                redis::cmd("GET").arg(&key).query(c)
            })?;
            let part = part.ok_or_else(|| bad(format!("chunk {i} is missing")))?;
            let want = chunk.min(bytes - i * chunk);
            if part.len() != want {
                return Err(bad(format!(
                    "chunk {i} has {} bytes, expected {want}",
                    part.len()
                )));
            }
            data.extend_from_slice(&part);
        }
        let params: Vec<f32> = data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let have = checksum(&params);
        if have != hash {
            return Err(BrokerError::BaseMismatch { want: hash, have });
        }
        Ok(params)
    }

    fn read_tasks(&mut self, max: usize, block: Duration) -> Result<Vec<Delivery>, BrokerError> {
        let tasks = self.keys.tasks();
        let consumer = self.config.consumer.clone();
        let read = |this: &mut Self| {
            let (t, c) = (tasks.clone(), consumer.clone());
            this.call_with("read tasks", block, move |conn| {
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(&c)
                    .arg("COUNT")
                    .arg(max.max(1))
                    .arg("BLOCK")
                    .arg(block.as_millis().max(1) as u64)
                    .arg("STREAMS")
                    .arg(&t)
                    .arg(">")
                    .query::<Value>(conn)
            })
        };
        let reply = match read(self) {
            Err(BrokerError::Server { reason, .. }) if reason.contains("NOGROUP") => {
                self.ensure_group()?;
                read(self)?
            }
            other => other?,
        };
        let streams = match reply {
            Value::Nil => return Ok(Vec::new()),
            Value::Array(s) => s,
            Value::Map(m) => m
                .into_iter()
                .map(|(k, v)| Value::Array(vec![k, v]))
                .collect(),
            _ => {
                return Err(WireError::Entry {
                    what: "task",
                    reason: "XREADGROUP reply is not an array".into(),
                }
                .into());
            }
        };
        let mut out = Vec::new();
        for s in streams {
            let Value::Array(mut pair) = s else { continue };
            let Some(list) = pair.pop() else { continue };
            for (id, payload) in entries(list)? {
                if let Some(d) = self.accept(id, &payload, 1)? {
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    fn extend(&mut self, delivery: &Delivery) -> Result<(), BrokerError> {
        let (s, k) = (self.extend.clone(), self.keys.tasks());
        let (id, consumer) = (delivery.id.clone(), self.config.consumer.clone());
        let ok: i64 = self.call("extend task lease", move |c| {
            s.key(&k).arg(GROUP).arg(&id).arg(&consumer).invoke(c)
        })?;
        if ok == 1 {
            Ok(())
        } else {
            Err(BrokerError::NotLeased {
                id: delivery.id.clone(),
                consumer: self.config.consumer.clone(),
            })
        }
    }

    fn ack(
        &mut self,
        delivery: &Delivery,
        results: &[TaskResult],
    ) -> Result<AckOutcome, BrokerError> {
        self.record(delivery, results, 0)
    }

    fn release(
        &mut self,
        delivery: &Delivery,
        results: &[TaskResult],
    ) -> Result<AckOutcome, BrokerError> {
        let idle = self.config.task_lease.as_millis().max(1) as u64;
        self.record(delivery, results, idle)
    }

    fn reclaim(&mut self, max: usize) -> Result<Reclaimed, BrokerError> {
        let s = self.reclaim.clone();
        let keys = [self.keys.tasks(), self.keys.dead(), self.keys.wake()];
        let consumer = self.config.consumer.clone();
        let idle = self.config.task_lease.as_millis().max(1) as u64;
        // Our own tasks come back to us only after three leases: another
        // host gets the first chance at a task this one failed.
        let own_idle = idle.saturating_mul(OWN_RECLAIM_LEASES);
        let scan = max.max(1) * 8 + 64;
        let (maxd, maxlen) = (self.config.max_deliveries, self.config.max_stream_len);
        let r = self.call("reclaim", move |c| {
            s.key(&keys[..])
                .arg(GROUP)
                .arg(&consumer)
                .arg(idle)
                .arg(max.max(1))
                .arg(maxd)
                .arg(maxlen)
                .arg(own_idle)
                .arg(scan)
                .invoke::<Value>(c)
        });
        let reply = match r {
            Err(BrokerError::Server { reason, .. }) if reason.contains("NOGROUP") => {
                self.ensure_group()?;
                return Ok(Reclaimed::default());
            }
            other => other?,
        };
        let bad = || WireError::Entry {
            what: "reclaim",
            reason: "reply is not {dead, {id, payload, deliveries, …}, {lost, …}}".into(),
        };
        let Value::Array(mut parts) = reply else {
            return Err(bad().into());
        };
        if parts.len() != 3 {
            return Err(bad().into());
        }
        let lost = match parts.pop().expect("three") {
            Value::Array(ids) => ids.into_iter().filter_map(text).collect(),
            _ => Vec::new(),
        };
        let list = parts.pop().expect("three");
        let dead = match parts.pop().expect("three") {
            Value::Int(n) => n.max(0) as usize,
            _ => return Err(bad().into()),
        };
        let Value::Array(flat) = list else {
            return Err(bad().into());
        };
        let mut tasks = Vec::new();
        for triple in flat.chunks(3) {
            let [id, payload, n] = triple else {
                return Err(bad().into());
            };
            let (Some(id), Value::BulkString(payload), Value::Int(n)) =
                (text(id.clone()), payload, n)
            else {
                return Err(bad().into());
            };
            if let Some(d) = self.accept(id, payload, (*n).max(0) as u64)? {
                tasks.push(d);
            }
        }
        Ok(Reclaimed {
            tasks,
            dead_lettered: dead,
            lost,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://evod:s3cret@db:6379/2"),
            "redis://evod:***@db:6379/2"
        );
        assert_eq!(redact_url("redis://:s3cret@db/"), "redis://:***@db/");
        assert_eq!(redact_url("redis://tok@db"), "redis://***@db");
        assert_eq!(redact_url("redis://db:6379/0"), "redis://db:6379/0");
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(
            redact_url("redis://u:pw@db/0?password=s3cret"),
            "redis://u:***@db/0?password=***"
        );
    }

    #[test]
    fn the_config_debug_hides_the_password() {
        let c = super::RedisConfig::new("redis://u:s3cret@db/0?pass=s3cret", "r", "c");
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("redis://u:***@db/0?pass=***"), "{shown}");
    }
}
