#!lua name=gapless
-- gapless Redis Function library, version 1 (see DESIGN.md §1.1 and §3).
--
-- Each numbered file in migrations/ holds the whole library at that version; `gapless
-- migrate` loads the newest with FUNCTION LOAD REPLACE and records its number at gl:schema.

-- gapless_append: append one or more notifications of ONE user, atomically.
--
-- KEYS[1] gl:{u}:m  hash: epoch, seq (last assigned)
-- KEYS[2] gl:{u}:s  stream, entry ids <seq>-0, fields p (payload), t (ingest ms), k (idem key)
-- KEYS[3] gl:{u}:r  sorted set: edge id -> lease expiry (ms)
-- KEYS[4] gl:{u}:a  hash: device -> ack position (expiry refreshed with the log)
-- KEYS[5..] gl:{u}:i:<key>, one per item that has an idempotency key, in item order
--
-- ARGV[1] epoch to use if the log is created by this call
-- ARGV[2] retention: MAXLEN ~ of the stream
-- ARGV[3] inactivity expiry of the user's keys, ms
-- ARGV[4] expiry of idempotency keys, ms
-- ARGV[5..] per item, two values: idempotency key ('' for none), payload
--
-- Returns { epoch, now_ms, { seq_1, dup_1, seq_2, dup_2, ... }, { live edge ids } }
-- where dup_i is 1 when item i repeated an idempotency key (seq_i is then the original seq).
local function append(keys, args)
  local meta, stream, registry, acks = keys[1], keys[2], keys[3], keys[4]
  local maxlen = tonumber(args[2])
  local ttl = tonumber(args[3])
  local idem_ttl = tonumber(args[4])
  if not maxlen or maxlen < 1 or not ttl or ttl < 1 or not idem_ttl or idem_ttl < 1
      or args[1] == nil or args[1] == '' or (#args - 4) % 2 ~= 0 then
    return redis.error_reply('ERR gapless_append: bad arguments')
  end

  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local now_s = string.format('%d', now)

  local epoch = redis.call('HGET', meta, 'epoch')
  local seq
  if not epoch then
    -- A new log: the first append, or the old log expired or was lost. A fresh epoch tells
    -- resuming clients that their positions no longer apply; nothing of an old stream may
    -- survive under it.
    epoch = args[1]
    seq = 0
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
  else
    seq = tonumber(redis.call('HGET', meta, 'seq')) or 0
  end

  local results = {}
  local next_key = 5
  for i = 5, #args, 2 do
    local idem, payload = args[i], args[i + 1]
    local duplicate_of = nil
    local ikey = nil
    if idem ~= '' then
      ikey = keys[next_key]
      next_key = next_key + 1
      if not ikey then
        return redis.error_reply('ERR gapless_append: missing idempotency key name')
      end
      -- Stored as <epoch>:<seq>; a key from an earlier epoch names an entry that is gone.
      local prior = redis.call('GET', ikey)
      if prior then
        local sep = string.find(prior, ':', 1, true)
        if sep and string.sub(prior, 1, sep - 1) == epoch then
          duplicate_of = tonumber(string.sub(prior, sep + 1))
        end
      end
    end
    if duplicate_of then
      results[#results + 1] = duplicate_of
      results[#results + 1] = 1
    else
      seq = seq + 1
      local id = string.format('%d-0', seq)
      if ikey then
        redis.call('XADD', stream, 'MAXLEN', '~', maxlen, id, 'p', payload, 't', now_s, 'k', idem)
        redis.call('SET', ikey, epoch .. ':' .. string.format('%d', seq), 'PX', idem_ttl)
      else
        redis.call('XADD', stream, 'MAXLEN', '~', maxlen, id, 'p', payload, 't', now_s)
      end
      results[#results + 1] = seq
      results[#results + 1] = 0
    end
  end

  redis.call('HSET', meta, 'seq', string.format('%d', seq))
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PEXPIRE', acks, ttl)

  -- Live edges only: a lease past its expiry belongs to an edge that stopped refreshing.
  redis.call('ZREMRANGEBYSCORE', registry, '-inf', now_s)
  local edges = redis.call('ZRANGE', registry, '(' .. now_s, '+inf', 'BYSCORE')

  return { epoch, now, results, edges }
end

redis.register_function('gapless_append', append)
