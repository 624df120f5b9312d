//! The Lua scripts that make each multi-key step atomic on the Redis
//! server (so a restarted or concurrent client never sees half of one).
//! Each returns plain values; the Rust side turns them into typed results.

/// Enqueue, fenced by the coordinator lease; once per round unless
/// forced (a re-enqueue of what is missing). The round is indexed under
/// its step (`ZADD GT`: the latest step that used it) so that a checkpoint
/// retires it, and its enqueue mark holds `<first task id> <candidates>`
/// (where its tasks start in the stream, and how many results complete
/// it).
/// KEYS: lease, tasks stream, enqueued mark, rounds index. ARGV: token,
/// group, maxlen, force (0/1), round, step, candidates, payloads…
/// Returns -1 (not the lease holder), 0 (already), or the count.
pub const ENQUEUE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[2], '0', 'MKSTREAM')
redis.call('ZADD', KEYS[4], 'GT', ARGV[6], ARGV[5])
local fresh = redis.call('EXISTS', KEYS[3]) == 0
if not fresh and ARGV[4] == '0' then return 0 end
local first
for i = 8, #ARGV do
  local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 't', ARGV[i])
  if not first then first = id end
end
if fresh then redis.call('SET', KEYS[3], (first or '0-0') .. ' ' .. ARGV[7]) end
return #ARGV - 7
"#;

/// Record results once, then acknowledge the task or release it; nothing
/// for a task that is not pending any more.
/// A task of a generation that is not enqueued (any more: retired once the
/// coordinator's checkpoint covered it) is acknowledged without recording
/// anything, even while still pending (a stalled round's old task, held by
/// a host cut off for longer than the round lasted): a late result of a
/// finished round must not re-create its results hash (a leak) nor count
/// again.
/// The results stream is a log (one entry per new result); the
/// coordinator is woken (`wake`, a list of at most one element) only when
/// the round has all its results, never per result.
/// KEYS: tasks stream, results stream, generation's results hash, hosts'
/// done counts, generation's enqueued mark, wake list. ARGV: group, id,
/// consumer, maxlen, release idle ms (0:
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
-- The hash keeps what the coordinator reads back: the result's version
-- byte, fitness and host (`u8 version | f64 fitness | host`); its run,
-- round and candidate are the key's and the field's. The whole result goes
-- to the log. A result too short to cut is kept whole (the reader refuses
-- it as malformed).
local function kept(p)
  local n = string.byte(p, 2)
  if not n or #p < 24 + n then return p end
  return string.sub(p, 1, 1) .. string.sub(p, 15 + n, 22 + n) .. string.sub(p, 24 + n)
end
local new = 0
for i = 6, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[3], ARGV[i], kept(ARGV[i + 1])) == 1 then
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
if new > 0 then
  local mark = redis.call('GET', KEYS[5])
  local total = mark and string.match(mark, ' (%d+)$')
  if total and redis.call('HLEN', KEYS[3]) >= tonumber(total) then
    redis.call('RPUSH', KEYS[6], '1')
    redis.call('LTRIM', KEYS[6], -1, -1)
  end
end
return new
"#;

/// Reclaim stale tasks of *other* consumers (a host is never handed back
/// the tasks it released or let lapse itself, unless they stayed idle for
/// `own min idle`: a run with one host still retries); dead-letter those
/// already delivered `max deliveries` times.
/// A dead letter wakes the coordinator (`wake`), which quarantines.
/// KEYS: tasks stream, dead-letter stream, wake list. ARGV: group,
/// consumer, min idle ms, count, max deliveries, dead maxlen, own min idle
/// ms, entries to scan.
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
if dead > 0 then
  redis.call('RPUSH', KEYS[3], '1')
  redis.call('LTRIM', KEYS[3], -1, -1)
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

/// Compare-and-delete keys and their index entry, fenced by the
/// coordinator lease (drop a base). KEYS: lease, index, keys to delete….
/// ARGV: token, member of the index. Returns the number deleted, or -1
/// (not the holder).
pub const DEL_FENCED: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('ZREM', KEYS[2], ARGV[2])
local deleted = 0
-- In slices: Lua's unpack refuses about 8000 values at once.
for i = 3, #KEYS, 1000 do
  deleted = deleted + redis.call('DEL', unpack(KEYS, i, math.min(i + 999, #KEYS)))
end
return deleted
"#;

/// Retire what a checkpoint covers, fenced by the coordinator lease:
/// delete the retired rounds' keys (results hash, enqueue mark) and the
/// retired bases' keys and remove both from their indexes; acknowledge the
/// tasks still pending before `minid` (the first task of the oldest round
/// still indexed: everything before it is of retired rounds; `''`: no
/// round is left, all of them), so that no host takes them over; and
/// delete the dead letters the coordinator has read (up to `dead read`)
/// whose round is not one still indexed (or that are malformed). The task
/// entries themselves stay, as the stream's history, until `MAXLEN ~`
/// trims them.
/// KEYS: lease, rounds index, bases index, tasks stream, dead-letter
/// stream, keys to delete…. ARGV: token, group, minid, dead read, number
/// of retired rounds, number of retired bases, retired round ids…, base
/// members…, live round ids as 8 little-endian bytes….
/// Returns -1 (not the holder) or {keys deleted, tasks acknowledged, dead
/// letters deleted}.
pub const RETIRE: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local nr, nb = tonumber(ARGV[5]), tonumber(ARGV[6])
for i = 7, 6 + nr do redis.call('ZREM', KEYS[2], ARGV[i]) end
for i = 7 + nr, 6 + nr + nb do redis.call('ZREM', KEYS[3], ARGV[i]) end
local live = {}
for i = 7 + nr + nb, #ARGV do live[ARGV[i]] = true end
local deleted = 0
-- In slices: Lua's unpack refuses about 8000 values at once.
for i = 6, #KEYS, 1000 do
  deleted = deleted + redis.call('DEL', unpack(KEYS, i, math.min(i + 999, #KEYS)))
end
local minid = ARGV[3]
if minid == '' then
  local last = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
  if #last == 0 then
    minid = '0-0'
  else
    local ms, seq = string.match(last[1][1], '^(%d+)-(%d+)$')
    minid = ms .. '-' .. string.format('%d', tonumber(seq) + 1)
  end
end
local acked = 0
if minid ~= '0-0' then
  while true do
    local ok, p = pcall(redis.call, 'XPENDING', KEYS[4], ARGV[2], '-', '(' .. minid, 1000)
    if not ok or #p == 0 then break end
    local ids = {}
    for _, e in ipairs(p) do ids[#ids + 1] = e[1] end
    local k = redis.call('XACK', KEYS[4], ARGV[2], unpack(ids))
    acked = acked + k
    if k == 0 then break end
  end
end
local gone = {}
for _, e in ipairs(redis.call('XRANGE', KEYS[5], '-', ARGV[4], 'COUNT', 10000)) do
  local t
  for i = 1, #e[2], 2 do
    if e[2][i] == 't' then t = e[2][i + 1] end
  end
  local keep = false
  -- A task: version, kind, flags, run length n, the run, then the
  -- round id (8 bytes).
  if t and #t >= 4 then
    local n = string.byte(t, 4)
    keep = live[string.sub(t, 5 + n, 12 + n)] == true
  end
  if not keep then gone[#gone + 1] = e[1] end
end
local dead = 0
for i = 1, #gone, 1000 do
  dead = dead + redis.call('XDEL', KEYS[5], unpack(gone, i, math.min(i + 999, #gone)))
end
return {deleted, acked, dead}
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
