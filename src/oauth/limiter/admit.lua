-- Admits a login attempt: the policy of oauth::limiter::LoginLimiter on counters every instance
-- shares. Both counters are checked before either counts the attempt.
-- KEYS: user counter, user attempts in flight, address counter, address attempts in flight
--   (a counter is a hash {f = failures, l = last failure ms}; attempts in flight a zset of
--   attempt id -> lease end, so the attempts of an instance that died lapse by themselves)
-- ARGV: now, attempt id, lease ms, free per user, max in flight per user, free per address,
--       max in flight per address, base wait ms, wait cap ms
-- Returns 0 (admitted) or the milliseconds to wait.
local now, lease = tonumber(ARGV[1]), tonumber(ARGV[3])
local base, cap = tonumber(ARGV[8]), tonumber(ARGV[9])

local function wait_ms(failures, free)
  if failures < free then return 0 end
  return math.min(base * 2 ^ math.min(failures - free, 20), cap)
end

local function check(counter, pending, free, max_pending, pending_as_failures)
  redis.call('ZREMRANGEBYSCORE', pending, '-inf', now)
  local f = redis.call('HMGET', counter, 'f', 'l')
  local failures, last = tonumber(f[1]) or 0, tonumber(f[2]) or now
  local wait = last + wait_ms(failures, free) - now
  if wait > 0 then return wait end
  local p = redis.call('ZCARD', pending)
  if p >= max_pending or (pending_as_failures and p > 0 and failures + p >= free) then return base end
  return 0
end

local w = check(KEYS[1], KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]), true)
if w > 0 then return w end
w = check(KEYS[3], KEYS[4], tonumber(ARGV[6]), tonumber(ARGV[7]), false)
if w > 0 then return w end
for _, k in ipairs({KEYS[2], KEYS[4]}) do
  redis.call('ZADD', k, now + lease, ARGV[2])
  redis.call('PEXPIRE', k, lease)
end
return 0
