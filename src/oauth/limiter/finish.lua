-- Ends an admitted attempt. Idempotent: an attempt no longer in flight (already finished, or its
-- lease lapsed) changes nothing.
-- KEYS: user counter, user attempts in flight, address counter, address attempts in flight
-- ARGV: attempt id, outcome ('s' succeeded, 'f' failed, 'a' abandoned), now, forget after ms
local function finish(counter, pending, reset_on_success)
  if redis.call('ZREM', pending, ARGV[1]) == 0 then return end
  if ARGV[2] == 'f' then
    redis.call('HINCRBY', counter, 'f', 1)
    redis.call('HSET', counter, 'l', ARGV[3])
    redis.call('PEXPIRE', counter, ARGV[4])
  elseif ARGV[2] == 's' and reset_on_success then
    redis.call('DEL', counter)
  end
end
finish(KEYS[1], KEYS[2], true)
finish(KEYS[3], KEYS[4], false)
return 1
