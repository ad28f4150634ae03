#!lua name=gapless
-- gapless Redis Function library, version 5 (see DESIGN.md §1.1 and §3).
-- gapless schema version: 5
--
-- This file holds the current library only (git keeps the earlier ones): `gapless migrate`
-- loads it with FUNCTION LOAD REPLACE, which upgrades a Redis at any earlier version, and
-- records the version at gl:schema.
--
-- Version 5 adds gapless_append_wake: gapless_append that also publishes the wakeups of what
-- it appended, one message per live edge of the call, in the postcard form the ingest writes
-- (shared/src/wakeup.rs). On one node this saves the ingest a second round trip per request
-- and the edge hears of an entry before the ingest has its reply (BENCHMARKS.md, issue 15).
-- The ingest calls it for one-item requests only: the wakeup costs the call a few strings
-- per item, more than one PUBLISH per request. A cluster keeps gapless_append: there
-- wakeups go by SPUBLISH to the edge's own shard.
--
-- Version 4 adds gapless_ack_devices: ack positions carry the time of their last write,
-- <epoch>:<seq>:<unix s>, and a device whose position was not written for the configured
-- device TTL is removed when a new device's position is added (a few positions sampled per
-- addition), so positions of devices that never come back do not pile up in a user's log.
-- Positions without a time (written by earlier versions) are read as before and kept.
--
-- Version 3 makes the append of a one-item user and the ack writes cheaper (BENCHMARKS.md).
-- The append no longer builds a closure and four tables per user, nor formats the time per
-- user. An ack in the same epoch as the device's stored position needs no read of the log's
-- epoch (moving a position forward within its epoch is right whether or not that epoch is
-- still the current one), so the common ack costs two commands instead of three, and
-- gapless_ack_users no longer copies each user's arguments.
--
-- Version 2 adds gapless_ack_users: the ack positions of many users in one call (an edge
-- flushing 10,000 users' acks paid one call per user with gapless_ack); and entries carry
-- their ingest time in the second part of the id, <seq>-<ms>, instead of a field t (a field
-- fewer per XADD: about a tenth of the append's cost). Readers accept both forms.
--
-- Costs were measured with callgrind on redis-server (instructions per appended entry, AOF
-- on): every redis.call and every argument counts, so the layout below keeps both few.

-- The empty list of a reply with no duplicates or no live edges; never written to.
local NONE = {}

-- Postcard (the encoding of shared/src/wakeup.rs): an unsigned integer is a LEB128 varint,
-- a string its byte length as a varint then the bytes, an Option a 0 or 1 byte then the
-- value. Integers here are below 2^53, exact in a Lua number.
local function varint(v)
  if v < 128 then
    return string.char(v)
  end
  local out = {}
  while v >= 128 do
    out[#out + 1] = string.char(v % 128 + 128)
    v = math.floor(v / 128)
  end
  out[#out + 1] = string.char(v)
  return table.concat(out)
end

-- Adds the WakeItem of one appended entry to the message of each of `edges` (c.wake: edge ->
-- list of encoded items). A payload rides along while it is at most c.payload_max bytes and
-- the edge's message holds at most c.payload_budget payload bytes, as the ingest decides.
--
-- Each item is one concatenation (one new string; a varint below 128 is a one-byte string
-- Lua already holds): strings are the dear part of a wakeup in Lua.
local function wake(c, edges, user, epoch, seq, payload)
  local len = #payload
  for e = 1, #edges do
    local edge = edges[e]
    local message = c.wake[edge]
    if not message then
      message = { used = 0 }
      c.wake[edge] = message
    end
    if len <= c.payload_max and message.used + len <= c.payload_budget then
      message.used = message.used + len
      message[#message + 1] = varint(#user) .. user .. varint(#epoch) .. epoch .. varint(seq)
        .. c.ts_varint .. '\1' .. varint(len) .. payload
    else
      message[#message + 1] = varint(#user) .. user .. varint(#epoch) .. epoch .. varint(seq)
        .. c.ts_varint .. '\0'
    end
  end
end

-- Publishes c.wake: Wakeup::V1(items), the envelope's variant index 0 then the item count.
-- A wakeup is a hint (DESIGN.md §1.3): a failure here is not the append's.
local function publish_wakeups(c)
  for edge, message in pairs(c.wake) do
    local items = #message == 1 and message[1] or table.concat(message)
    redis.pcall('PUBLISH', 'gl:wake:{' .. edge .. '}', '\0' .. varint(#message) .. items)
  end
end

-- Appends one user's items. `k` is the index of the user's first key in `keys`, `a` of the
-- user's header in `args`; `c` holds what every user of the call shares (see append).
-- Returns the user's reply and the next `k` and `a`.
--
-- A user's failure (a key of the wrong type, written by someone else) must not touch the
-- other users of the call, and must not leave the log inconsistent: everything that can fail
-- is read before the first write, writes go through pcall, and the recorded seq always
-- matches the stream's last entry. The reply says from which item on the user failed.
--
-- Most users of a call have one item and no idempotency key, so that path allocates no
-- table but its reply and its edges (version 3; per-user closures and empty tables were a
-- measurable part of a one-item user's cost).
local function append_user(keys, args, k, a, c)
  local meta, stream, registry, acks = keys[k], keys[k + 1], keys[k + 2], keys[k + 3]
  local epoch_candidate, n, m = args[a], tonumber(args[a + 1]), tonumber(args[a + 2])
  local idem_keys = k + 4 -- keys[idem_keys + j - 1] is the name of idempotency key j
  local idem_args = a + 3 -- args[idem_args + 2(j-1)] = item index, next = the key itself
  local payloads = idem_args + 2 * m
  local next_k, next_a = idem_keys + m, payloads + n

  -- Reads first. Idempotency keys: item index -> j, and key name -> stored value.
  local state = redis.pcall('HMGET', meta, 'epoch', 'seq', 'x')
  if state.err then
    return { '', 0, NONE, NONE, 1, state.err }, next_k, next_a
  end
  local idem_of, stored
  if m > 0 then
    idem_of, stored = {}, {}
    for j = 1, m do
      idem_of[tonumber(args[idem_args + 2 * (j - 1)])] = j
      local ikey = keys[idem_keys + j - 1]
      if stored[ikey] == nil then
        local prior = redis.pcall('GET', ikey)
        if type(prior) == 'table' and prior.err then
          return { '', 0, NONE, NONE, 1, prior.err }, next_k, next_a
        end
        stored[ikey] = prior
      end
    end
  end

  local epoch, seq, refreshed = state[1], tonumber(state[2]) or 0, tonumber(state[3]) or 0
  if not epoch then
    -- A new log: the first append, or the old log expired or was lost. A fresh epoch tells
    -- resuming clients that their positions no longer apply; nothing of an old stream may
    -- survive under it.
    epoch = epoch_candidate
    seq = 0
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'epoch', epoch)
  end

  local first_seq = seq + 1
  local duplicates = NONE
  local failed_at, failure = 0, ''
  local id_suffix = c.id_suffix
  for i = 1, n do
    local payload = args[payloads + i - 1]
    local j = idem_of and idem_of[i]
    local added
    if j then
      local ikey = keys[idem_keys + j - 1]
      local idem = args[idem_args + 2 * (j - 1) + 1]
      -- Stored as <epoch>:<seq>; a key from an earlier epoch names an entry that is gone.
      local prior, duplicate_of = stored[ikey], nil
      if prior then
        local sep = string.find(prior, ':', 1, true)
        if sep and string.sub(prior, 1, sep - 1) == epoch then
          duplicate_of = tonumber(string.sub(prior, sep + 1))
        end
      end
      if duplicate_of then
        if duplicates == NONE then
          duplicates = {}
        end
        duplicates[#duplicates + 1] = i
        duplicates[#duplicates + 1] = duplicate_of
      else
        added = redis.pcall('XADD', stream, (seq + 1) .. id_suffix, 'p', payload, 'k', idem)
        if not added.err then
          seq = seq + 1
          stored[ikey] = epoch .. ':' .. seq
          redis.pcall('SET', ikey, stored[ikey], 'PX', c.idem_ttl)
        end
      end
    else
      -- Lua prints integers below 1e14 exactly (%.14g); concatenation is measurably
      -- cheaper than string.format here.
      added = redis.pcall('XADD', stream, (seq + 1) .. id_suffix, 'p', payload)
      if not added.err then
        seq = seq + 1
      end
    end
    if added and added.err then
      failed_at, failure = i, added.err
      break
    end
  end

  -- One trim per user and call, not one per XADD: trimming arguments on every XADD cost
  -- more than the append itself (4.9 µs against 2.8 µs per entry with AOF on). A log that
  -- never held more than maxlen entries has nothing to trim.
  if seq > c.maxlen then
    redis.pcall('XTRIM', stream, 'MAXLEN', '~', c.maxlen)
  end

  -- Refresh the inactivity expiry only when 1% of it has passed since the last refresh
  -- (field x of the meta hash): every refresh is three writes that go to the AOF and
  -- replicas, which a busy user would otherwise pay on every call. An idle log therefore
  -- expires between 99% and 100% of the configured time after its last append. Seqs are
  -- passed as numbers: Redis formats them with %.14g, exact below 1e14.
  if c.now - refreshed >= c.refresh_every then
    redis.call('HSET', meta, 'seq', seq, 'x', c.now_s)
    redis.call('PEXPIRE', meta, c.ttl)
    redis.call('PEXPIRE', stream, c.ttl)
    redis.call('PEXPIRE', acks, c.ttl)
  else
    redis.call('HSET', meta, 'seq', seq)
  end

  -- Live edges only: a lease past its expiry belongs to an edge that stopped refreshing and
  -- is removed. The set is small (the edges holding this user), so one read serves both.
  local edges = NONE
  local leases = redis.pcall('ZRANGE', registry, 0, -1, 'WITHSCORES')
  if not leases.err and #leases > 0 then
    edges = {}
    local now = c.now
    for i = 1, #leases, 2 do
      if tonumber(leases[i + 1]) > now then
        edges[#edges + 1] = leases[i]
      else
        redis.call('ZREM', registry, leases[i])
      end
    end
  end

  if c.wake and edges ~= NONE and #edges > 0 and seq >= first_seq then
    -- The appended items are those before failed_at that are not duplicates, with the
    -- consecutive seqs first_seq .. seq in item order.
    local user = string.sub(meta, 5, -4) -- gl:{<user>}:m
    local next_seq, last = first_seq, n
    if failed_at > 0 then
      last = failed_at - 1
    end
    local duplicate = NONE
    if duplicates ~= NONE then
      duplicate = {}
      for d = 1, #duplicates, 2 do
        duplicate[duplicates[d]] = true
      end
    end
    for i = 1, last do
      if not duplicate[i] then
        wake(c, edges, user, epoch, next_seq, args[payloads + i - 1])
        next_seq = next_seq + 1
      end
    end
  end

  return { epoch, seq, duplicates, edges, failed_at, failure }, next_k, next_a
end

-- gapless_append: append notifications of one or more users; each user's part is atomic
-- (the whole call is), and a call only names keys of one Cluster slot.
--
-- KEYS, per user in call order:
--   gl:{u}:m  hash: epoch, seq (last assigned), x (when the expiry was last refreshed, ms)
--   gl:{u}:s  stream, entry ids <seq>-<ingest ms>, fields p (payload), k (idem key)
--   gl:{u}:r  sorted set: edge id -> lease expiry (ms)
--   gl:{u}:a  hash: device -> ack position (expiry refreshed with the log)
--   gl:{u}:i:<key> for each of the user's m idempotency keys, in the order of ARGV
-- ARGV:
--   [1] retention: XTRIM MAXLEN ~ of each stream, applied once per user and call
--   [2] inactivity expiry of a user's keys, ms
--   [3] expiry of idempotency keys, ms
--   then per user: epoch to use if this call creates the log, item count n, count m of
--   items with an idempotency key, m pairs (item index 1..n, idempotency key), n payloads
--
-- Returns { now_ms, { epoch, last_seq, duplicates, live edge ids, failed_at, error }, ... },
-- one entry per user. Items that were appended got consecutive seqs ending at last_seq, in
-- item order; `duplicates` lists (item index, original seq) of items whose idempotency key
-- was seen. failed_at is 0, or the index of the first item that was not appended because
-- Redis refused it (with the error); that item and the user's later ones were not written.
--
-- `first` is the index of the first user's header in ARGV; `wake`, when given, holds what
-- gapless_append_wake publishes with (see there).
local function append_call(name, keys, args, first, wake_with)
  local maxlen = tonumber(args[1])
  local ttl = tonumber(args[2])
  local idem_ttl = tonumber(args[3])
  if not maxlen or maxlen < 1 or not ttl or ttl < 1 or not idem_ttl or idem_ttl < 1 then
    return redis.error_reply('ERR ' .. name .. ': bad arguments')
  end
  -- Check the whole layout before the first write: a Function is not rolled back, so an
  -- error half-way would leave entries appended past the recorded seq.
  local k, a = 1, first
  while a <= #args do
    local n, m = tonumber(args[a + 1]), tonumber(args[a + 2])
    if args[a] == '' or not n or not m or n < 0 or m < 0 or m > n
        or a + 2 + 2 * m + n > #args then
      return redis.error_reply('ERR ' .. name .. ': bad user header at argument ' .. a)
    end
    for j = 1, m do
      local i = tonumber(args[a + 3 + 2 * (j - 1)])
      if not i or i < 1 or i > n then
        return redis.error_reply('ERR ' .. name .. ': bad item index at argument ' .. a)
      end
    end
    k = k + 4 + m
    a = a + 3 + 2 * m + n
  end
  if k ~= #keys + 1 or a ~= #args + 1 then
    return redis.error_reply('ERR ' .. name .. ': keys and items do not match')
  end

  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local now_s = string.format('%d', now)
  local c = {
    maxlen = maxlen,
    ttl = ttl,
    idem_ttl = idem_ttl,
    now = now,
    now_s = now_s,
    -- Entry ids are <seq>-<ingest ms>: seqs increase, so any second part keeps ids increasing.
    id_suffix = '-' .. now_s,
    refresh_every = math.floor(ttl / 100),
  }
  if wake_with then
    c.wake = {}
    c.payload_max = wake_with.payload_max
    c.payload_budget = wake_with.payload_budget
    c.ts_varint = varint(now)
  end
  local reply = { now }
  local users, nargs = 1, #args
  k, a = 1, first
  while a <= nargs do
    users = users + 1
    reply[users], k, a = append_user(keys, args, k, a, c)
  end
  if wake_with then
    publish_wakeups(c)
  end
  return reply
end

local function append(keys, args)
  return append_call('gapless_append', keys, args, 4, nil)
end

redis.register_function('gapless_append', append)

-- gapless_append_wake (version 5): gapless_append, and the wakeups of the appended entries
-- published by the call itself, for a single Redis (not a cluster: there an edge's channel
-- lives on another shard). Each live edge of the call's users gets one message on
-- gl:wake:{<edge>}, Wakeup::V1 of its items in call order, duplicates left out.
--
-- ARGV: [1]-[3] as gapless_append; [4] the largest payload that rides in a wakeup, bytes;
-- [5] the most payload bytes in one edge's message (later items go without theirs); then
-- the users as in gapless_append. Returns what gapless_append returns.
local function append_wake(keys, args)
  local payload_max, payload_budget = tonumber(args[4]), tonumber(args[5])
  if not payload_max or payload_max < 0 or not payload_budget or payload_budget < 0 then
    return redis.error_reply('ERR gapless_append_wake: bad wakeup arguments')
  end
  return append_call('gapless_append_wake', keys, args, 6, {
    payload_max = payload_max,
    payload_budget = payload_budget,
  })
end

redis.register_function('gapless_append_wake', append_wake)

-- A stored position <epoch>:<seq>[:<unix s>] as (epoch, seq, time); time is nil for a
-- position written before version 4, everything nil for a value that is not a position.
local function parse_position(stored)
  if not stored then
    return nil
  end
  local sep = string.find(stored, ':', 1, true)
  if not sep then
    return nil
  end
  local epoch = string.sub(stored, 1, sep - 1)
  local rest = string.sub(stored, sep + 1)
  local sep2 = string.find(rest, ':', 1, true)
  if sep2 then
    return epoch, tonumber(string.sub(rest, 1, sep2 - 1)), tonumber(string.sub(rest, sep2 + 1))
  end
  return epoch, tonumber(rest), nil
end

-- Positions sampled for expiry each time a new device's position is added.
local EXPIRY_SAMPLE = 8

-- Removes sampled positions last written before `oldest` (unix s). Positions without a time
-- (written before version 4) and start markers are kept: their age is unknown.
local function expire_devices(acks, oldest)
  local sample = redis.call('HRANDFIELD', acks, EXPIRY_SAMPLE, 'WITHVALUES')
  for i = 1, #sample, 2 do
    local _, _, written = parse_position(sample[i + 1])
    if written and written < oldest then
      redis.call('HDEL', acks, sample[i])
    end
  end
end

-- Records one user's ack positions from args[first], args[first + 1], ... (count triples of
-- device, epoch, seq), with the rules of gapless_ack below. Returns the number written.
--
-- A position is written only if it is ahead of what is stored for the device in the same
-- epoch, or, where the device has nothing stored in that epoch, only if that epoch is the
-- log's current one. Within one epoch a position only moves forward, whether or not the epoch
-- is still current (a stale epoch's position stays stale, and a resume treats it as such);
-- so the log's epoch is read only when the device's stored epoch differs, once per user.
--
-- `now` (unix s) given: positions are written with it, and when a device without a stored
-- position is added, positions last written before `oldest` are expired (expire_devices).
local function ack_user(meta, acks, args, first, count, now, oldest)
  local current -- the log's epoch: nil until read, false if the user has no log
  local written = 0
  local added = false
  for i = first, first + 3 * (count - 1), 3 do
    local device, epoch, seq = args[i], args[i + 1], tonumber(args[i + 2])
    if seq then
      local stored = redis.call('HGET', acks, device)
      local stored_epoch, stored_seq = parse_position(stored)
      local write
      if stored_epoch == epoch and stored_seq then
        write = seq > stored_seq
      else
        if current == nil then
          current = redis.call('HGET', meta, 'epoch') or false
        end
        write = epoch == current
      end
      if write then
        local value = epoch .. ':' .. string.format('%d', seq)
        if now then
          value = value .. ':' .. now
        end
        redis.call('HSET', acks, device, value)
        written = written + 1
        added = added or not stored
      end
    end
  end
  if added and oldest then
    expire_devices(acks, oldest)
  end
  return written
end

-- gapless_ack: record the ack positions of devices of one user, never moving one back.
--
-- KEYS[1] gl:{u}:m (for the current epoch), KEYS[2] gl:{u}:a (device -> <epoch>:<seq>)
-- ARGV: triples of device, epoch, seq
--
-- A device's position changes epoch only to the log's current one and never moves back
-- within its epoch (see ack_user): an edge flushing late (the device has moved on to another
-- edge since) cannot rewind it. Returns the number of positions written.
local function ack(keys, args)
  local meta, acks = keys[1], keys[2]
  if not meta or not acks or #args % 3 ~= 0 then
    return redis.error_reply('ERR gapless_ack: bad arguments')
  end
  return ack_user(meta, acks, args, 1, #args / 3, nil, nil)
end

redis.register_function('gapless_ack', ack)

-- Records the positions of several users from args[first], ...: per user the count c of
-- positions, then c triples of device, epoch, seq; keys are gl:{u}:m, gl:{u}:a per user.
local function ack_many(name, keys, args, first, now, oldest)
  if #keys % 2 ~= 0 then
    return redis.error_reply('ERR ' .. name .. ': bad arguments')
  end
  -- Check the layout before the first write.
  local a = first
  for _ = 1, #keys / 2 do
    local c = tonumber(args[a])
    if not c or c < 0 or a + 3 * c > #args then
      return redis.error_reply('ERR ' .. name .. ': bad user header at argument ' .. a)
    end
    a = a + 1 + 3 * c
  end
  if a ~= #args + 1 then
    return redis.error_reply('ERR ' .. name .. ': keys and positions do not match')
  end
  local written = 0
  a = first
  for u = 1, #keys / 2 do
    local c = tonumber(args[a])
    written = written + ack_user(keys[2 * u - 1], keys[2 * u], args, a + 1, c, now, oldest)
    a = a + 1 + 3 * c
  end
  return written
end

-- gapless_ack_users: gapless_ack for several users in one call, with the same rules (what
-- edges before version 4 call; positions are written without a time and never expire).
--
-- KEYS, per user: gl:{u}:m, gl:{u}:a. ARGV, per user: the count c of positions, then c
-- triples of device, epoch, seq. Returns the number of positions written.
local function ack_users(keys, args)
  return ack_many('gapless_ack_users', keys, args, 1, nil, nil)
end

redis.register_function('gapless_ack_users', ack_users)

-- gapless_ack_devices: gapless_ack_users with positions stamped with the time and expired
-- when unused (version 4).
--
-- KEYS as gapless_ack_users. ARGV[1]: the device TTL in seconds (0: positions never expire),
-- then the arguments of gapless_ack_users. Returns the number of positions written.
local function ack_devices(keys, args)
  local ttl = tonumber(args[1])
  if not ttl or ttl < 0 then
    return redis.error_reply('ERR gapless_ack_devices: bad device TTL')
  end
  local now = tonumber(redis.call('TIME')[1])
  local oldest = nil
  if ttl > 0 then
    oldest = now - ttl
  end
  return ack_many('gapless_ack_devices', keys, args, 2, now, oldest)
end

redis.register_function('gapless_ack_devices', ack_devices)
