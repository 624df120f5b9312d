//! The Lua scripts that make each multi-key step atomic on the Redis
//! server (so a restarted or concurrent client never sees half of one).
//! Each returns plain values; the Rust side turns them into typed results.

/// Enqueue, fenced by the coordinator lease; once per generation unless
/// forced (a re-enqueue of what is missing).
/// KEYS: lease, tasks stream, enqueued mark. ARGV: token, group, maxlen,
/// force (0/1), payloads… Returns -1 (not the lease holder), 0 (already),
/// or the count.
pub const ENQUEUE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
if not redis.call('SET', KEYS[3], '1', 'NX') and ARGV[4] == '0' then return 0 end
for i = 5, #ARGV do
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 't', ARGV[i])
end
return #ARGV - 4
"#;

/// Record results once and acknowledge. A task of a generation that is
/// not enqueued (any more: retired once the coordinator's checkpoint
/// covered it) is acknowledged without recording anything: a late result
/// of a finished round must not re-create its results hash (a leak) nor
/// count again.
/// KEYS: tasks stream, results stream, generation's results hash, hosts'
/// done counts, generation's enqueued mark. ARGV: group, id, consumer,
/// maxlen, (candidate, payload)… Returns the number of new results.
pub const ACK: &str = r#"
if redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local new = 0
for i = 5, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'r', ARGV[i + 1])
    new = new + 1
  end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[4], ARGV[3], new)
return new
"#;

/// Reclaim stale tasks; dead-letter those delivered too often.
/// KEYS: tasks stream, dead-letter stream. ARGV: group, consumer,
/// min idle ms, count, max deliveries, dead maxlen.
/// Returns {dead count, {id, payload, deliveries, …}, {lost id, …}} (lost:
/// pending entries trimmed from the stream, which Redis drops).
pub const RECLAIM: &str = r#"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[4])
local out = {}
local dead = 0
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local id = e[1]
    local payload = e[2][2]
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
    local n = p[1][4]
    if n > tonumber(ARGV[5]) then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 't', payload, 'id', id, 'n', n, 'c', ARGV[2])
      redis.call('XACK', KEYS[1], ARGV[1], id)
      dead = dead + 1
    else
      table.insert(out, id)
      table.insert(out, payload)
      table.insert(out, n)
    end
  end
end
return {dead, out, r[3] or {}}
"#;

/// Restart a task's idle time if it is still ours.
/// KEYS: tasks stream. ARGV: group, id, consumer. Returns 1 or 0.
pub const EXTEND: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"#;

/// Compare-and-renew the lease. KEYS: lease. ARGV: token, ttl ms.
pub const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Compare-and-delete the lease. KEYS: lease. ARGV: token.
pub const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// Heartbeat with the server's clock. KEYS: workers hash, seen hash.
/// ARGV: host, workers.
pub const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], t[1] * 1000 + math.floor(t[2] / 1000))
return 1
"#;

/// The server's clock in ms.
pub const NOW_MS: &str = r#"
local t = redis.call('TIME')
return t[1] * 1000 + math.floor(t[2] / 1000)
"#;

/// A plain `SET`, fenced by the coordinator lease (the run's model file).
/// KEYS: lease, key. ARGV: token, value. Returns 1, or 0 (not the holder).
pub const SET_FENCED: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"#;
