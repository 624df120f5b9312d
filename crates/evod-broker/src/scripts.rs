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

/// Record results once, then acknowledge the task or release it; nothing
/// for a task that is not pending any more.
/// A task of a generation that is not enqueued (any more: retired once the
/// coordinator's checkpoint covered it) is acknowledged without recording
/// anything, even while still pending (a stalled round's old task, held by
/// a host cut off for longer than the round lasted): a late result of a
/// finished round must not re-create its results hash (a leak) nor count
/// again.
/// KEYS: tasks stream, results stream, generation's results hash, hosts'
/// done counts, generation's enqueued mark. ARGV: group, id, consumer,
/// maxlen, release idle ms (0:
/// acknowledge; else the task stays pending, its idle time set to this so
/// that another host takes it over at once), (candidate, payload)…
/// Returns the number of new results.
pub const ACK: &str = r#"
-- A task no longer pending was acknowledged already (by this host, whose
-- reply was lost, or by another that took it over): its results are
-- duplicates, even if its round was retired meanwhile and its hash is gone.
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
if redis.call('EXISTS', KEYS[5]) == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
  return 0
end
local new = 0
for i = 6, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'r', ARGV[i + 1])
    new = new + 1
  end
end
if ARGV[5] == '0' then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
else
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
  if #p > 0 and p[1][2] == ARGV[3] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[5], 'JUSTID')
  end
end
redis.call('HINCRBY', KEYS[4], ARGV[3], new)
return new
"#;

/// Reclaim stale tasks of *other* consumers (a host is never handed back
/// the tasks it released or let lapse itself, unless they stayed idle for
/// `own min idle`: a run with one host still retries); dead-letter those
/// already delivered `max deliveries` times.
/// KEYS: tasks stream, dead-letter stream. ARGV: group, consumer, min idle
/// ms, count, max deliveries, dead maxlen, own min idle ms, entries to scan.
/// Returns {dead count, {id, payload, deliveries, …}, {lost id, …}} (lost:
/// pending entries trimmed from the stream, acknowledged here).
pub const RECLAIM: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+', ARGV[8])
local out, lost = {}, {}
local dead, taken = 0, 0
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return ''
end
for _, e in ipairs(p) do
  if taken >= tonumber(ARGV[4]) then break end
  local id, owner, idle, n = e[1], e[2], e[3], e[4]
  if owner ~= ARGV[2] or idle >= tonumber(ARGV[7]) then
    local entry = redis.call('XRANGE', KEYS[1], id, id)
    if #entry == 0 or not entry[1][2] then
      redis.call('XACK', KEYS[1], ARGV[1], id)
      table.insert(lost, id)
    elseif n >= tonumber(ARGV[5]) then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 't', field(entry[1][2], 't'), 'id', id, 'n', n, 'c', owner)
      redis.call('XACK', KEYS[1], ARGV[1], id)
      dead = dead + 1
    else
      -- JUSTID does not count a delivery: RETRYCOUNT does.
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'RETRYCOUNT', n + 1, 'JUSTID')
      table.insert(out, id)
      table.insert(out, field(entry[1][2], 't'))
      table.insert(out, n + 1)
      taken = taken + 1
    end
  end
end
return {dead, out, lost}
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
/// Returns 1 (renewed), 2 (the key had expired — a Redis outage longer
/// than the ttl — and nobody else took it: taken again with the same
/// token) or 0 (another holder: lost).
pub const RENEW: &str = r#"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not v then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
return 0
"#;

/// Compare-and-delete keys, fenced by the coordinator lease (retire a
/// round, drop a base). KEYS: lease, keys to delete…. ARGV: token.
/// Returns the number deleted, or -1 (not the holder).
pub const DEL_FENCED: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if #KEYS < 2 then return 0 end
return redis.call('DEL', unpack(KEYS, 2))
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
