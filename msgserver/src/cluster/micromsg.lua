#!lua name=micromsg_1
-- micromsg's routing and delivery rules for the Redis backend, as one Redis
-- Functions library (Redis >= 7.0). Every function runs atomically inside Redis,
-- so any number of msgserver cores can share the state without locks of their own;
-- the cores only park polls and pass answers on. msgserver/src/cluster/mod.rs loads
-- this file (FUNCTION LOAD REPLACE) and docs/CLUSTER.md describes the key layout.
--
-- Conventions. Every function is called with no keys and the key prefix as its
-- first argument. Numbers leave Lua through string.format('%d'): Lua's tostring
-- prints doubles with 14 digits, which would corrupt message ids (~1.8e15). Time is
-- Redis's own clock, so that expiries and timeouts mean the same on every core.
--
-- Per session S, under prefix P:
--   P:q:S      stream, its mailbox; entry id "<seq>-0"; fields i (public id),
--              b (body), e (expiry ms, 0 never), c (channel or ""), p (priority),
--              t (queued at ms). One consumer group "g" with one consumer "c": the
--              pending-entry list holds what was given and not yet acknowledged.
--   P:back:S   list: x0-mode messages a handler could not pass on (JSON [id, body,
--              expiry], numbers as strings: cjson keeps only 14 digits)
--   P:s:S      hash: user, paused
--   P:subs:S   set: the session's subscriptions (JSON [pattern, subject, group])
--   P:poll:S   "<member>|<nonce>|<max>" of the poll parked for S, so that a
--              publish hands its messages to that core: a member is
--              "<node>.<incarnation>", one per core process, and the consumer name
--              under which that core reads mailboxes
--   P:kick:S   exists while S is kicked
-- Shared: P:id (id counter), P:cfg (settings), P:mailboxes (sessions with a
-- mailbox stream, for the operator's counts), P:seen (zset of present sessions
-- by last seen), P:user:U (set), P:pat / P:wild (patterns subscribed / the
-- wildcard ones), P:m:<pattern> (set of JSON [session, subject, group]),
-- P:turn:<pattern> (consumer-group turns), P:h:<channel> (history stream) with
-- P:hmeta:<channel>, P:hists (channels with history), P:reply:<id>, P:key:<src>\0<key>,
-- P:dead (dead letters stream), P:wake:<member> (the pub/sub channel each core
-- listens on while it lives).

local SYS = '$sys'
-- The consumer of entries due for redelivery at once; the cores read mailboxes
-- as consumers of their own ("<node>.<incarnation>").
local DUE_CONSUMER = 'due'
-- An idle time that makes a pending entry due for redelivery at once.
local DUE = '1000000000000'
local MAX_TTL_MS = 10 * 365 * 24 * 3600 * 1000

local function d(n) return string.format('%d', n) end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function cfg(P)
  local v = redis.call('HMGET', P .. ':cfg', 'mode', 'max_len', 'overflow', 'ttl_ms',
    'vis_ms', 'max_deliveries', 'dedup_ms', 'session_ms', 'kick_ms', 'max_reply_ms',
    'max_payload', 'idle_ms', 'prioritised')
  if not v[1] then
    error({ err = 'NOINIT micromsg settings missing (Redis lost its data?)' })
  end
  return {
    ack = v[1] == 'ack', max_len = tonumber(v[2]), reject = v[3] == 'reject',
    ttl_ms = tonumber(v[4]), vis_ms = tonumber(v[5]), max_deliveries = tonumber(v[6]),
    dedup_ms = tonumber(v[7]), session_ms = tonumber(v[8]), kick_ms = tonumber(v[9]),
    max_reply_ms = tonumber(v[10]), max_payload = tonumber(v[11]), idle_ms = tonumber(v[12]),
    prioritised = v[13] == '1',
  }
end

local function chunks(list, f)
  local i = 1
  while i <= #list do
    f(unpack(list, i, math.min(i + 499, #list)))
    i = i + 500
  end
end

local function fields(entry)
  local f, kv = {}, entry[2]
  for i = 1, #kv, 2 do f[kv[i]] = kv[i + 1] end
  return f
end

local function seq_of(stream_id) return tonumber(string.match(stream_id, '^(%d+)')) end

local function json(s) return cjson.encode(s) end

-- Patterns ------------------------------------------------------------------

local function split(s)
  local out, start = {}, 1
  while true do
    local i = string.find(s, '.', start, true)
    if not i then
      out[#out + 1] = string.sub(s, start)
      return out
    end
    out[#out + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

-- As routing::Pattern::matches: '*' one token, a final '>' one or more; the core's
-- '$' channels only for a pattern that names them.
local function matches(pattern, name)
  local pt = split(pattern)
  if string.sub(name, 1, 1) == '$' and (pt[1] == '*' or pt[1] == '>') then return false end
  local nt = split(name)
  for i, tok in ipairs(pt) do
    local part = nt[i]
    if tok == '>' then return part ~= nil and part ~= '' end
    if part == nil then return false end
    if tok == '*' then
      if part == '' then return false end
    elseif tok ~= part then
      return false
    end
  end
  return #nt == #pt
end

-- Every wildcard pattern that matches a channel name of n tokens: each token itself
-- or '*', and in place of the tokens from any point on, '>'. That is fewer than
-- 2^(n+1) names, so a short channel name asks for them rather than trying every
-- wildcard pattern subscribed (one per user would make every publish scan them all).
local function wildcard_candidates(name)
  local nt = split(name)
  local system = string.sub(name, 1, 1) == '$'
  local out, prefixes = {}, { '' }
  for i, tok in ipairs(nt) do
    -- As matches: '*' and '>' take non-empty tokens only, and never a '$' name's first.
    local wild = tok ~= '' and not (system and i == 1)
    local longer = {}
    for _, p in ipairs(prefixes) do
      if wild then out[#out + 1] = p .. '>' end
      longer[#longer + 1] = p .. tok
      if wild then longer[#longer + 1] = p .. '*' end
    end
    for j, p in ipairs(longer) do longer[j] = p .. '.' end
    prefixes = longer
  end
  for _, p in ipairs(prefixes) do
    local candidate = string.sub(p, 1, -2)
    if candidate ~= name then out[#out + 1] = candidate end
  end
  return out
end

-- Candidates asked for in one SMISMEMBER; a name with more tokens tries every
-- wildcard pattern instead.
local MAX_CANDIDATES = 1024

local function patterns_for(P, channel)
  local out = {}
  if redis.call('SISMEMBER', P .. ':pat', channel) == 1 then out[1] = channel end
  local wild = P .. ':wild'
  local subscribed = redis.call('SCARD', wild)
  if subscribed == 0 then return out end
  local tokens = select(2, string.gsub(channel, '%.', '')) + 1
  if 2 ^ (tokens + 1) < math.min(subscribed, MAX_CANDIDATES) then
    local candidates = wildcard_candidates(channel)
    if #candidates == 0 then return out end
    for i, held in ipairs(redis.call('SMISMEMBER', wild, unpack(candidates))) do
      if held == 1 then out[#out + 1] = candidates[i] end
    end
  else
    for _, w in ipairs(redis.call('SMEMBERS', wild)) do
      if w ~= channel and matches(w, channel) then out[#out + 1] = w end
    end
  end
  return out
end

local function is_paused(P, S) return redis.call('HGET', P .. ':s:' .. S, 'paused') == '1' end

-- Higher priority first, then oldest first.
local function by_priority(a, b)
  if a[4] ~= b[4] then return a[4] > b[4] end
  if a[1] ~= b[1] then return a[1] < b[1] end
  return a[3] < b[3]
end

-- The sessions a message on channel with subject goes to, each once: every plain
-- subscriber whose subject pattern matches, and one member of each consumer group
-- in turn, passing over paused members while an unpaused one is there.
local function route(P, channel, subject)
  local chosen, seen = {}, {}
  local function add(s)
    if not seen[s] then
      seen[s] = true
      chosen[#chosen + 1] = s
    end
  end
  for _, pat in ipairs(patterns_for(P, channel)) do
    local groups, order = {}, {}
    for _, m in ipairs(redis.call('SMEMBERS', P .. ':m:' .. pat)) do
      local member = cjson.decode(m)
      local sp = member[2]
      if sp == '' or (subject ~= '' and matches(sp, subject)) then
        if member[3] == '' then
          add(member[1])
        else
          local key = sp .. '\0' .. member[3]
          if not groups[key] then
            groups[key] = {}
            order[#order + 1] = key
          end
          table.insert(groups[key], member[1])
        end
      end
    end
    table.sort(order)
    for _, key in ipairs(order) do
      local members = groups[key]
      table.sort(members)
      local n = #members
      local turn = tonumber(redis.call('HGET', P .. ':turn:' .. pat, key) or '0')
      local pick
      for i = 0, n - 1 do
        local at = (turn + i) % n
        if not is_paused(P, members[at + 1]) then
          pick = at
          break
        end
      end
      pick = pick or (turn % n)
      redis.call('HSET', P .. ':turn:' .. pat, key, d(pick + 1))
      add(members[pick + 1])
    end
  end
  table.sort(chosen)
  return chosen
end

-- Mailboxes -------------------------------------------------------------------

local function qkey(P, S) return P .. ':q:' .. S end

-- Called when a mailbox holds nothing: it may not exist yet. Only ack mode reads
-- through the consumer group; an x0 poll reads and deletes in one step.
local function ensure_mailbox(P, c, S, q)
  if c.ack and redis.call('EXISTS', q) == 0 then
    redis.call('XGROUP', 'CREATE', q, 'g', '0', 'MKSTREAM')
  end
  -- The index the operator's counts walk (no write when S is in it already); a
  -- mailbox that expired is dropped from it there.
  redis.call('SADD', P .. ':mailboxes', S)
end

local function last_delivered(q)
  local g = redis.call('XINFO', 'GROUPS', q)[1]
  for i = 1, #g, 2 do
    if g[i] == 'last-delivered-id' then return g[i + 1] end
  end
  return '0-0'
end

local function pending_count(c, q)
  if not c.ack or redis.call('EXISTS', q) == 0 then return 0 end
  return redis.call('XPENDING', q, 'g')[1]
end

-- Where the messages not yet given out start in a mailbox stream.
local function ready_from(c, q)
  if c.ack then return '(' .. last_delivered(q) end
  return '-'
end

-- A key that outlives what it holds by the idle timeout, then goes by itself.
-- Extended at most once per `slack` ms: every write is one more for the AOF.
local function keep_for(key, ms, slack)
  if redis.call('PTTL', key) < ms - (slack or 0) then redis.call('PEXPIRE', key, d(ms)) end
end

-- The poll key holds "<member>|<nonce>|<max>": the poll's token, then how many
-- messages its reply may carry.
local function poll_token(stored)
  if not stored then return nil end
  return string.match(stored, '^(.*)|[^|]*$')
end

-- Tells the core holding S's parked poll to poll again ("w" + session): for what
-- it must find out itself (a kick, a resume, a newer poll elsewhere).
local function wake(P, S)
  local t = redis.call('GET', P .. ':poll:' .. S)
  if t then redis.call('PUBLISH', P .. ':wake:' .. string.match(t, '^(.-)|'), 'w' .. S) end
end

-- Set below, once take() exists: hands what is ready for S straight to the core
-- holding S's parked poll.
local hand_over

local function is_kicked(P, S) return redis.call('EXISTS', P .. ':kick:' .. S) == 1 end

-- Queues one copy; returns how many older ones were dropped for room, or -1 with
-- the ready count when the mailbox is full under the reject policy.
local function enqueue(P, c, now, S, id, seq, body, channel, prio, expires, max_pending)
  local q = qkey(P, S)
  local dropped = 0
  local ready = redis.call('XLEN', q)
  if ready == 0 then ensure_mailbox(P, c, S, q) end
  if c.ack then ready = ready - redis.call('XPENDING', q, 'g')[1] end
  if max_pending > 0 and channel ~= '' and ready >= max_pending then
    local same, oldest = 0, nil
    for _, e in ipairs(redis.call('XRANGE', q, ready_from(c, q), '+')) do
      if fields(e).c == channel then
        same = same + 1
        oldest = oldest or e[1]
      end
    end
    if same >= max_pending then
      redis.call('XDEL', q, oldest)
      dropped = dropped + 1
      ready = ready - 1
    end
  end
  if ready >= c.max_len then
    if c.reject then return -1, ready end
    local over = ready - math.max(c.max_len, 1) + 1
    local oldest = redis.call('XRANGE', q, ready_from(c, q), '+', 'COUNT', d(over))
    for _, e in ipairs(oldest) do
      redis.call('XDEL', q, e[1])
      dropped = dropped + 1
    end
  end
  redis.call('XADD', q, d(seq) .. '-0', 'i', d(id), 'b', body, 'e', d(expires), 'c', channel,
    'p', d(prio), 't', d(now))
  -- Only when every default message expires: a stream's expiry must not take a
  -- message that was to be kept for ever with it.
  if expires > 0 and c.ttl_ms > 0 then
    keep_for(q, expires - now + c.idle_ms, math.min(60000, c.idle_ms / 2))
  end
  return dropped
end

local function expiry(c, now, ttl_ms)
  local ttl = ttl_ms
  if ttl == nil then ttl = c.ttl_ms else ttl = math.min(ttl, MAX_TTL_MS) end
  if ttl == 0 and ttl_ms == nil then return 0 end
  return now + ttl
end

-- System events ---------------------------------------------------------------

local function session_event(S, user, reason)
  local out = '{"session":' .. json(S) .. ',"user":' .. (user and json(user) or 'null')
  if reason then out = out .. ',"reason":' .. json(reason) end
  return out .. '}'
end

local function emit(P, c, now, subject, data)
  if #patterns_for(P, SYS) == 0 then return end
  local recipients = route(P, SYS, subject)
  if #recipients == 0 then return end
  local id = redis.call('INCR', P .. ':id')
  local body = '{"id":' .. d(id) .. ',"time":' .. d(now)
    .. ',"source":null,"target":{"channel":"$sys"},"subject":' .. json(subject)
    .. ',"data":' .. data .. '}'
  for i, r in ipairs(recipients) do
    local seq = id
    if i > 1 then seq = redis.call('INCR', P .. ':id') end
    enqueue(P, c, now, r, id, seq, body, SYS, 0, expiry(c, now, nil), 0)
    hand_over(P, c, now, r)
  end
end

-- A request from S itself: present from now until silent for the session timeout.
-- The last-seen time is written at most every twentieth of the session timeout:
-- a write per request would be an AOF write per request.
local function touch(P, c, now, S)
  local seen = redis.call('ZSCORE', P .. ':seen', S)
  if seen then
    if now - tonumber(seen) >= c.session_ms / 20 then
      redis.call('ZADD', P .. ':seen', d(now), S)
    end
    return
  end
  redis.call('ZADD', P .. ':seen', d(now), S)
  local user = redis.call('HGET', P .. ':s:' .. S, 'user')
  emit(P, c, now, 'session.joined', session_event(S, user or nil, nil))
end

-- Subscriptions -----------------------------------------------------------------

local function remove_subscription(P, c, now, S, pattern, subject, group)
  local member = json({ S, subject, group })
  if redis.call('SREM', P .. ':m:' .. pattern, member) == 0 then return 0 end
  redis.call('SREM', P .. ':subs:' .. S, json({ pattern, subject, group }))
  if redis.call('EXISTS', P .. ':m:' .. pattern) == 0 then
    redis.call('SREM', P .. ':pat', pattern)
    redis.call('SREM', P .. ':wild', pattern)
    redis.call('DEL', P .. ':turn:' .. pattern)
    if string.sub(pattern, 1, 1) ~= '$' then
      emit(P, c, now, 'channel.removed', '{"channel":' .. json(pattern) .. '}')
    end
  end
  return 1
end

-- S is no longer present: its subscriptions, binding and pause go; its messages
-- stay until they expire or it comes back.
local function leave(P, c, now, S, announce)
  local was_joined = redis.call('ZREM', P .. ':seen', S) == 1
  for _, sub in ipairs(redis.call('SMEMBERS', P .. ':subs:' .. S)) do
    local s = cjson.decode(sub)
    remove_subscription(P, c, now, S, s[1], s[2], s[3])
  end
  redis.call('DEL', P .. ':subs:' .. S)
  local user = redis.call('HGET', P .. ':s:' .. S, 'user')
  if user then redis.call('SREM', P .. ':user:' .. user, S) end
  redis.call('DEL', P .. ':s:' .. S)
  if was_joined and announce then
    emit(P, c, now, 'session.left', session_event(S, user or nil, nil))
  end
  return user or nil
end

local function kick(P, c, now, S, reason)
  redis.call('SET', P .. ':kick:' .. S, '1', 'PX', d(math.max(c.kick_ms, 1)))
  local user = leave(P, c, now, S, false)
  local q = qkey(P, S)
  local dropped = redis.call('XLEN', q) + redis.call('LLEN', P .. ':back:' .. S)
  redis.call('DEL', q, P .. ':back:' .. S)
  wake(P, S)
  emit(P, c, now, 'session.kicked', session_event(S, user, reason))
  return dropped
end

-- Delivery ----------------------------------------------------------------------

-- Pending entries: {stream id, consumer, idle ms, deliveries}.
local function pending(q)
  if redis.call('EXISTS', q) == 0 then return {} end
  return redis.call('XPENDING', q, 'g', '-', '+', '1000000')
end

local function forget(q, ids)
  if #ids > 0 then
    chunks(ids, function(...) redis.call('XACK', q, 'g', ...) end)
    chunks(ids, function(...) redis.call('XDEL', q, ...) end)
  end
end

-- Pending entries ready again at once, without counting a delivery.
local function make_due(q, entries)
  for _, p in ipairs(entries) do
    redis.call('XCLAIM', q, 'g', DUE_CONSUMER, '0', p[1], 'IDLE', DUE, 'RETRYCOUNT',
      d(math.max(p[4] - 1, 0)), 'JUSTID')
  end
end

local function dead_letter(P, S, q, entry, deliveries)
  local f = fields(entry)
  redis.call('XADD', P .. ':dead', '*', 's', S, 'i', f.i, 'b', f.b, 'n', d(deliveries),
    'c', f.c or '', 'p', f.p or '0')
end

-- Takes up to `max` (0: all) ready messages for S: handed back ones first, then
-- those due for redelivery, then new ones; higher priority first, else oldest.
-- Returns the batch ({id, body, seq, prio}) and counts.
-- Puts an entry read from a mailbox into the batch ({id, body, seq, priority,
-- deliveries}), or, past its expiry, among the `gone` and counted.
local function give(batch, n, gone, now, entry, deliveries)
  local f = fields(entry)
  local e_ms = tonumber(f.e)
  if e_ms > 0 and e_ms <= now then
    n.expired = n.expired + 1
    gone[#gone + 1] = entry[1]
  else
    batch[#batch + 1] = { tonumber(f.i), f.b, seq_of(entry[1]), tonumber(f.p), deliveries }
  end
end

-- x0 mode: a poll removes what it returns, so messages are read and deleted in
-- one step; its mailboxes never use the consumer group. `batch` holds the
-- handed-back ones already.
local function take_x0(c, now, q, back, max, batch, n)
  local read = { 'XRANGE', q, '-', '+' }
  if max > 0 and not c.prioritised then
    if #batch >= max then return batch, n end
    read[5] = 'COUNT'
    read[6] = d(max - #batch)
  end
  local gone = {}
  for _, e in ipairs(redis.call(unpack(read))) do give(batch, n, gone, now, e, 1) end
  table.sort(batch, by_priority)
  if max > 0 and #batch > max then
    for i = #batch, max + 1, -1 do
      local m = batch[i]
      -- What does not fit stays where it was: in the stream, or handed back.
      if m[3] == 0 then redis.call('LPUSH', back, json({ d(m[1]), m[2], '0' })) end
      batch[i] = nil
    end
  end
  for _, m in ipairs(batch) do
    if m[3] > 0 then gone[#gone + 1] = d(m[3]) .. '-0' end
  end
  if #gone > 0 then chunks(gone, function(...) redis.call('XDEL', q, ...) end) end
  return batch, n
end

local function take(P, c, now, S, max, member)
  local q = qkey(P, S)
  local batch, n = {}, { expired = 0, dead = 0, redelivered = 0 }
  local function room() return max == 0 or #batch < max end
  local back = P .. ':back:' .. S
  local items = redis.call('LRANGE', back, '0', '-1')
  if #items > 0 then
    redis.call('DEL', back)
    local keep = {}
    for _, raw in ipairs(items) do
      local m = cjson.decode(raw)
      local id, e = tonumber(m[1]), tonumber(m[3])
      if e > 0 and e <= now then
        n.expired = n.expired + 1
      elseif room() then
        batch[#batch + 1] = { id, m[2], 0, 0 }
      else
        keep[#keep + 1] = raw
      end
    end
    if #keep > 0 then
      chunks(keep, function(...) redis.call('RPUSH', back, ...) end)
      if c.ttl_ms > 0 then keep_for(back, c.ttl_ms + c.idle_ms) end
    end
  end
  if not c.ack then return take_x0(c, now, q, back, max, batch, n) end
  if redis.call('EXISTS', q) == 0 then return batch, n end
  local gone = {}
  for _, p in ipairs(pending(q)) do
    local due = p[3] >= c.vis_ms
    -- With priorities every due entry competes for the batch; the rest goes back.
    if due and (c.prioritised or room()) then
      if c.ack and c.max_deliveries > 0 and p[4] >= c.max_deliveries then
        local e = redis.call('XRANGE', q, p[1], p[1])[1]
        if e then
          dead_letter(P, S, q, e, p[4])
          n.dead = n.dead + 1
        end
        gone[#gone + 1] = p[1]
      else
        local e = redis.call('XCLAIM', q, 'g', member, '0', p[1])[1]
        if e then give(batch, n, gone, now, e, p[4] + 1) end
      end
    end
  end
  if c.prioritised or room() then
    local args = { 'XREADGROUP', 'GROUP', 'g', member }
    -- With priorities everything is read and sorted, the rest handed back below.
    if max > 0 and not c.prioritised then
      args[#args + 1] = 'COUNT'
      args[#args + 1] = d(max - #batch)
    end
    args[#args + 1] = 'STREAMS'
    args[#args + 1] = q
    args[#args + 1] = '>'
    local got = redis.call(unpack(args))
    if got then
      for _, e in ipairs(got[1][2]) do give(batch, n, gone, now, e, 1) end
    end
  end
  forget(q, gone)
  table.sort(batch, by_priority)
  if max > 0 and #batch > max then
    local rest = {}
    for i = max + 1, #batch do
      local m = batch[i]
      if m[3] == 0 then
        redis.call('RPUSH', back, json({ d(m[1]), m[2], '0' }))
      else
        rest[#rest + 1] = { d(m[3]) .. '-0', member, 0, m[5] }
      end
      batch[i] = nil
    end
    make_due(q, rest)
  end
  for _, m in ipairs(batch) do
    if m[5] and m[5] > 1 then n.redelivered = n.redelivered + 1 end
  end
  return batch, n
end

-- A publish hands the messages to the core whose poll is parked for S in the same
-- step ("m" + JSON [poll key, session, id, body, ...] on its wake-up channel),
-- instead of waking it to ask for them with a call of its own: one call per
-- message less. A core that gets them for a poll that has ended meanwhile hands
-- them back. Nothing is taken for a paused session, nor for a core that no longer
-- listens (it died; its poll ended with its connection).
hand_over = function(P, c, now, S)
  local pkey = P .. ':poll:' .. S
  local stored = redis.call('GET', pkey)
  if not stored or is_paused(P, S) then return end
  local member, max = string.match(stored, '^(.-)|.*|([^|]*)$')
  local channel = P .. ':wake:' .. member
  if redis.call('PUBSUB', 'NUMSUB', channel)[2] == 0 then
    redis.call('DEL', pkey)
    return
  end
  local batch = take(P, c, now, S, tonumber(max), member)
  if #batch == 0 then return end
  redis.call('DEL', pkey)
  local out = { poll_token(stored), S }
  for _, m in ipairs(batch) do
    out[#out + 1] = d(m[1])
    out[#out + 1] = m[2]
  end
  redis.call('PUBLISH', channel, 'm' .. cjson.encode(out))
end

-- Milliseconds until the first message given out becomes due again (0: none).
local function next_due(c, q)
  if not c.ack then return 0 end
  local soonest = 0
  for _, p in ipairs(pending(q)) do
    -- Entries already due wait for a resume (a paused session), not a timer.
    if p[3] < c.vis_ms then
      local left = c.vis_ms - p[3]
      if soonest == 0 or left < soonest then soonest = left end
    end
  end
  return soonest
end

-- Acknowledges pending entries whose public id `covers`; returns how many.
local function ack_where(q, covers)
  local ids = {}
  for _, p in ipairs(pending(q)) do
    local e = redis.call('XRANGE', q, p[1], p[1])[1]
    if e and covers(tonumber(fields(e).i), p) then ids[#ids + 1] = p[1] end
  end
  forget(q, ids)
  return #ids
end

-- Whether the core that reads as `consumer` lives: it holds its wake-up
-- subscription while it runs, and Redis drops that the moment the core's
-- connection closes, as the kernel closes it when the process dies.
local function alive(P, consumer)
  return redis.call('PUBSUB', 'NUMSUB', P .. ':wake:' .. consumer)[2] > 0
end

-- The x0 rule "asking again acknowledges what was given before", for a poll
-- through core `member`. A batch this core, or another live core, gave out is
-- acknowledged. One that a core which has died since gave out may never have
-- reached the browser (the tab asks here because that core failed it): it is due
-- again at once, and this very poll gives it, as a single core gives again what
-- went out on a handler connection that closed. Returns how many were acknowledged.
local function ack_previous(P, c, S, q, member)
  local done, back, lives = {}, {}, {}
  for _, p in ipairs(pending(q)) do
    if p[3] < c.vis_ms and p[2] ~= DUE_CONSUMER then
      local consumer = p[2]
      if lives[consumer] == nil then
        lives[consumer] = consumer == member or alive(P, consumer)
      end
      if lives[consumer] then
        done[#done + 1] = p[1]
      else
        back[#back + 1] = p
      end
    end
  end
  forget(q, done)
  make_due(q, back)
  return #done
end

-- The start of a request that session a[2] makes itself: nothing when it is
-- kicked, else the prefix, the session, the settings and the time, with the
-- session marked present.
local function acting(a)
  local P, S = a[1], a[2]
  if is_kicked(P, S) then return nil end
  local c = cfg(P)
  local now = now_ms()
  touch(P, c, now, S)
  return P, S, c, now
end

-- The functions -------------------------------------------------------------------

-- P, settings as field/value pairs. Every core writes its own settings; they must
-- agree (docs/CLUSTER.md). Returns the settings that were there before.
local function mm_init(_, a)
  local P = a[1]
  local before = redis.call('HGETALL', P .. ':cfg')
  redis.call('HSET', P .. ':cfg', unpack(a, 2))
  -- Ids go on from the wall clock in microseconds, as a memory-only core's do.
  local t = redis.call('TIME')
  redis.call('SET', P .. ':id', t[1] .. string.format('%06d', tonumber(t[2])), 'NX')
  return before
end

-- P, S, token, timeout_ms, ack_previous, max, resume.
-- {'kicked'} | {'superseded'} | {'park', due_ms, acked} |
-- {'msgs', acked, expired, dead, redelivered, id, body, id, body, ...}
local function mm_poll(_, a)
  local P, S, token = a[1], a[2], a[3]
  local timeout, ack_prev, max, resume = tonumber(a[4]), a[5] == '1', tonumber(a[6]), a[7] == '1'
  local c = cfg(P)
  local now = now_ms()
  local pkey = P .. ':poll:' .. S
  if is_kicked(P, S) then return { 'kicked' } end
  local current = poll_token(redis.call('GET', pkey))
  if resume and current ~= token then return { 'superseded' } end
  if current and current ~= token then
    -- A newer poll ends the older one, parked on whichever core.
    redis.call('PUBLISH', P .. ':wake:' .. string.match(current, '^(.-)|'), 'w' .. S)
  end
  touch(P, c, now, S)
  local q = qkey(P, S)
  local acked = 0
  local member = string.match(token, '^(.-)|')
  if c.ack and ack_prev then acked = ack_previous(P, c, S, q, member) end
  local batch, n = {}, { expired = 0, dead = 0, redelivered = 0 }
  if not is_paused(P, S) then batch, n = take(P, c, now, S, max, member) end
  if #batch == 0 and timeout > 0 then
    redis.call('SET', pkey, token .. '|' .. d(max), 'PX', d(timeout + 5000))
    return { 'park', next_due(c, q), acked }
  end
  redis.call('DEL', pkey)
  local out = { 'msgs', acked, n.expired, n.dead, n.redelivered }
  for _, m in ipairs(batch) do
    out[#out + 1] = d(m[1])
    out[#out + 1] = m[2]
  end
  return out
end

-- P, src, dst, body, key ('' none). {'ok', id, dropped, duplicate} | {'kicked', who} |
-- {'full', ready}
local function mm_publish(_, a)
  local P, src, dst, body, key = a[1], a[2], a[3], a[4], a[5]
  local c = cfg(P)
  local now = now_ms()
  local kkey = P .. ':key:' .. src .. '\0' .. key
  -- One look for both kicks: on the hot path, neither is.
  if redis.call('EXISTS', P .. ':kick:' .. src, P .. ':kick:' .. dst) > 0 then
    if is_kicked(P, src) then return { 'kicked', src } end
    local id = key ~= '' and redis.call('GET', kkey)
    if id then return { 'ok', tonumber(id), 0, 1 } end
    return { 'kicked', dst }
  end
  local id = redis.call('INCR', P .. ':id')
  if key ~= '' then
    -- Remembered and checked in one step; forgotten again if the message is refused.
    local first = redis.call('SET', kkey, d(id), 'PX', d(math.max(c.dedup_ms, 1)), 'NX', 'GET')
    if first then return { 'ok', tonumber(first), 0, 1 } end
  end
  local dropped, ready = enqueue(P, c, now, dst, id, id, body, '', 0, expiry(c, now, nil), 0)
  if dropped < 0 then
    if key ~= '' then redis.call('DEL', kkey) end
    return { 'full', ready }
  end
  hand_over(P, c, now, dst)
  return { 'ok', id, dropped, 0 }
end

-- P, src ('' backend), kind (s|u|c|b|r), target, subject, reference, head, target_json,
-- tail, ttl_ms ('' default), key, expect_reply_ms, max_pending, priority,
-- history_len, history_ms. The envelope is head .. target_json .. tail after the id
-- and time; for a reply (kind r) the target is the awaiting session.
-- {'ok', id, recipients, dropped, duplicate} | {'kicked', who} | {'noroute'} |
-- {'full', ready} | {'toolarge', bytes}
local function mm_send(_, a)
  local P, src, kind, target, subject, reference = a[1], a[2], a[3], a[4], a[5], a[6]
  local head, target_json, tail, ttl_ms, key = a[7], a[8], a[9], a[10], a[11]
  local expect_ms, max_pending, prio = tonumber(a[12]), tonumber(a[13]), tonumber(a[14])
  local history_len, history_ms = tonumber(a[15]), tonumber(a[16])
  local c = cfg(P)
  local now = now_ms()
  if src ~= '' then
    if is_kicked(P, src) then return { 'kicked', src } end
    touch(P, c, now, src)
  end
  local kkey = P .. ':key:' .. src .. '\0' .. key
  if key ~= '' then
    local id = redis.call('GET', kkey)
    if id then return { 'ok', tonumber(id), 0, 0, 1 } end
  end
  local recipients, channel = {}, ''
  if kind == 's' then
    if is_kicked(P, target) then return { 'kicked', target } end
    recipients = { target }
  elseif kind == 'u' then
    recipients = redis.call('SMEMBERS', P .. ':user:' .. target)
    table.sort(recipients)
  elseif kind == 'b' then
    recipients = redis.call('ZRANGEBYSCORE', P .. ':seen', d(now - c.session_ms), '+inf')
    table.sort(recipients)
  elseif kind == 'c' then
    channel = target
    recipients = route(P, target, subject)
  else
    local to = redis.call('GET', P .. ':reply:' .. reference)
    if not to or is_kicked(P, to) then return { 'noroute' } end
    recipients = { to }
    target_json = '{"session":' .. json(to) .. '}'
  end
  local id = redis.call('INCR', P .. ':id')
  local body = '{"id":' .. d(id) .. ',"time":' .. d(now) .. head .. target_json .. tail
  if #body > c.max_payload then return { 'toolarge', #body } end
  local ttl = nil
  if ttl_ms ~= '' then ttl = tonumber(ttl_ms) end
  local expires = expiry(c, now, ttl)
  local queued, dropped = 0, 0
  for i, r in ipairs(recipients) do
    local seq = id
    if i > 1 then seq = redis.call('INCR', P .. ':id') end
    local n, ready = enqueue(P, c, now, r, id, seq, body, channel, prio, expires, max_pending)
    if n < 0 then
      if #recipients == 1 then return { 'full', ready } end
      dropped = dropped + 1
    else
      queued = queued + 1
      dropped = dropped + n
      hand_over(P, c, now, r)
    end
  end
  -- Remembered only once accepted: a refused message is not resumed, answered or
  -- taken for a duplicate when retried.
  if channel ~= '' and history_len > 0 then
    local h = P .. ':h:' .. channel
    local meta = P .. ':hmeta:' .. channel
    redis.call('XADD', h, d(id) .. '-0', 's', subject, 'b', body, 't', d(now))
    while redis.call('XLEN', h) > history_len do
      local first = redis.call('XRANGE', h, '-', '+', 'COUNT', '1')[1]
      redis.call('XDEL', h, first[1])
      redis.call('HSET', meta, 'trimmed', d(seq_of(first[1])))
    end
    redis.call('HSET', meta, 'ms', d(history_ms), 'prio', d(prio))
    redis.call('SADD', P .. ':hists', channel)
  end
  if expect_ms > 0 and src ~= '' then
    redis.call('SET', P .. ':reply:' .. d(id), src, 'PX', d(math.max(math.min(expect_ms, c.max_reply_ms), 1)))
  end
  if key ~= '' then redis.call('SET', kkey, d(id), 'PX', d(math.max(c.dedup_ms, 1))) end
  return { 'ok', id, queued, dropped, 0 }
end

-- P, S, kind (all|ids|upto), ids.... {'kicked'} | {'ok', count}
local function mm_ack(_, a)
  local P, S, c = acting(a)
  if not P then return { 'kicked' } end
  local kind = a[3]
  if not c.ack then return { 'ok', 0 } end
  local q = qkey(P, S)
  local count
  if kind == 'all' then
    count = ack_where(q, function(_, p) return p[3] < c.vis_ms end)
  elseif kind == 'upto' then
    local cursor = tonumber(a[4])
    count = ack_where(q, function(id) return id <= cursor end)
  else
    local want = {}
    for i = 4, #a do want[tonumber(a[i])] = true end
    count = ack_where(q, function(id) return want[id] == true end)
  end
  return { 'ok', count }
end

-- P, S, then id, body pairs: messages a handler could not pass on. {'kicked'} | {'ok'}
local function mm_return(_, a)
  local P, S = a[1], a[2]
  local c = cfg(P)
  local now = now_ms()
  if is_kicked(P, S) then return { 'kicked' } end
  local q = qkey(P, S)
  if c.ack then
    local want = {}
    for i = 3, #a, 2 do want[tonumber(a[i])] = true end
    local due = {}
    for _, p in ipairs(pending(q)) do
      local e = redis.call('XRANGE', q, p[1], p[1])[1]
      if e and want[tonumber(fields(e).i)] then due[#due + 1] = p end
    end
    make_due(q, due)
  else
    -- Gone from the stream already: they come back with a fresh time to live.
    local back = P .. ':back:' .. S
    local e = expiry(c, now, nil)
    for i = 3, #a, 2 do redis.call('RPUSH', back, json({ a[i], a[i + 1], d(e) })) end
    if c.ttl_ms > 0 then keep_for(back, c.ttl_ms + c.idle_ms) end
  end
  wake(P, S)
  return { 'ok' }
end

-- P, S. Everything given to S and not acknowledged is ready again. {'kicked'} | {'ok', n}
local function mm_release(_, a)
  local P, S, c = acting(a)
  if not P then return { 'kicked' } end
  if not c.ack then return { 'ok', 0 } end
  local q = qkey(P, S)
  local due = {}
  for _, p in ipairs(pending(q)) do
    if p[3] < c.vis_ms then due[#due + 1] = p end
  end
  make_due(q, due)
  wake(P, S)
  return { 'ok', #due }
end

-- P, S, pattern, subject, group, since ('' none), literal_keeps_history (0|1).
-- {'kicked'} | {'ok', recovered, complete}
local function mm_subscribe(_, a)
  local P, S, pattern, subject, group, since = a[1], a[2], a[3], a[4], a[5], a[6]
  local literal_history = a[7] == '1'
  local c = cfg(P)
  local now = now_ms()
  if is_kicked(P, S) then return { 'kicked' } end
  local m = P .. ':m:' .. pattern
  local created = redis.call('EXISTS', m) == 0
  local added = redis.call('SADD', m, json({ S, subject, group })) == 1
  touch(P, c, now, S)
  if added then
    redis.call('SADD', P .. ':subs:' .. S, json({ pattern, subject, group }))
    redis.call('SADD', P .. ':pat', pattern)
    if string.find(pattern, '[*>]') then redis.call('SADD', P .. ':wild', pattern) end
    if created and string.sub(pattern, 1, 1) ~= '$' then
      emit(P, c, now, 'channel.created', '{"channel":' .. json(pattern) .. '}')
    end
  end
  if since == '' then return { 'ok', 0, 1 } end
  since = tonumber(since)
  local complete = true
  local channels
  if string.find(pattern, '[*>]') then
    channels = {}
    for _, ch in ipairs(redis.call('SMEMBERS', P .. ':hists')) do
      if matches(pattern, ch) then channels[#channels + 1] = ch end
    end
  else
    complete = literal_history
    channels = { pattern }
  end
  local q = qkey(P, S)
  local held = {}
  if redis.call('EXISTS', q) == 1 then
    for _, e in ipairs(redis.call('XRANGE', q, '-', '+')) do held[tonumber(fields(e).i)] = true end
  end
  local found = {}
  for _, ch in ipairs(channels) do
    local meta = redis.call('HMGET', P .. ':hmeta:' .. ch, 'trimmed', 'ms', 'prio')
    local trimmed, age_ms, prio = tonumber(meta[1] or '0'), tonumber(meta[2] or '0'), tonumber(meta[3] or '0')
    local h = P .. ':h:' .. ch
    if age_ms > 0 then
      -- Older than the channel keeps history: gone, as if trimmed.
      for _, e in ipairs(redis.call('XRANGE', h, '-', '+')) do
        if tonumber(fields(e).t) >= now - age_ms then break end
        redis.call('XDEL', h, e[1])
        trimmed = math.max(trimmed, seq_of(e[1]))
        redis.call('HSET', P .. ':hmeta:' .. ch, 'trimmed', d(trimmed))
      end
    end
    if trimmed > since then complete = false end
    for _, e in ipairs(redis.call('XRANGE', h, '(' .. d(since) .. '-0', '+')) do
      local f = fields(e)
      local id = seq_of(e[1])
      local ok = subject == '' or (f.s ~= '' and matches(subject, f.s))
      if ok and not held[id] then found[#found + 1] = { id, f.b, ch, prio } end
    end
  end
  table.sort(found, function(x, y) return x[1] < y[1] end)
  local expires = expiry(c, now, nil)
  for _, m in ipairs(found) do
    enqueue(P, c, now, S, m[1], redis.call('INCR', P .. ':id'), m[2], m[3], m[4], expires, 0)
  end
  if #found > 0 then hand_over(P, c, now, S) end
  return { 'ok', #found, complete and 1 or 0 }
end

-- P, S, pattern, subject, group. {'kicked'} | {'ok', removed}
local function mm_unsubscribe(_, a)
  local P, S, c, now = acting(a)
  if not P then return { 'kicked' } end
  return { 'ok', remove_subscription(P, c, now, S, a[3], a[4], a[5]) }
end

-- P, S, reference, ttl_ms. {'kicked'} | {'ok'}
local function mm_await(_, a)
  local P, S, c = acting(a)
  if not P then return { 'kicked' } end
  local ttl = math.max(math.min(tonumber(a[4]), c.max_reply_ms), 1)
  redis.call('SET', P .. ':reply:' .. a[3], S, 'PX', d(ttl))
  return { 'ok' }
end

-- P, S, paused (0|1). {'kicked'} | {'ok'}
local function mm_pause(_, a)
  local P, S = acting(a)
  if not P then return { 'kicked' } end
  if a[3] == '1' then
    redis.call('HSET', P .. ':s:' .. S, 'paused', '1')
  else
    redis.call('HDEL', P .. ':s:' .. S, 'paused')
    wake(P, S)
  end
  return { 'ok' }
end

-- P, channel. Flat session, user ('' none) pairs, sorted by session.
local function mm_presence(_, a)
  local P, channel = a[1], a[2]
  local seen, sessions = {}, {}
  for _, pat in ipairs(patterns_for(P, channel)) do
    for _, m in ipairs(redis.call('SMEMBERS', P .. ':m:' .. pat)) do
      local s = cjson.decode(m)[1]
      if not seen[s] then
        seen[s] = true
        sessions[#sessions + 1] = s
      end
    end
  end
  table.sort(sessions)
  local out = {}
  for _, s in ipairs(sessions) do
    out[#out + 1] = s
    out[#out + 1] = redis.call('HGET', P .. ':s:' .. s, 'user') or ''
  end
  return out
end

-- P, S, user, exclusive (0|1). {'kicked'} | {'ok', kicked}
local function mm_bind(_, a)
  local P, S, user, exclusive = a[1], a[2], a[3], a[4] == '1'
  local c = cfg(P)
  local now = now_ms()
  if is_kicked(P, S) then return { 'kicked' } end
  local previous = redis.call('HGET', P .. ':s:' .. S, 'user')
  if previous and previous ~= user then redis.call('SREM', P .. ':user:' .. previous, S) end
  redis.call('HSET', P .. ':s:' .. S, 'user', user)
  redis.call('SADD', P .. ':user:' .. user, S)
  touch(P, c, now, S)
  local kicked = 0
  if exclusive then
    for _, other in ipairs(redis.call('SMEMBERS', P .. ':user:' .. user)) do
      if other ~= S then
        kick(P, c, now, other, 'another session of this user took over')
        kicked = kicked + 1
      end
    end
  end
  return { 'ok', kicked }
end

-- P, S, reason. {dropped}
local function mm_kick(_, a)
  local P = a[1]
  return { kick(P, cfg(P), now_ms(), a[2], a[3]) }
end

-- P, then sessions with a poll parked on the calling core: they are present.
-- Sessions silent for the session timeout leave. {left}
local function mm_sweep(_, a)
  local P = a[1]
  local c = cfg(P)
  local now = now_ms()
  for i = 2, #a do redis.call('ZADD', P .. ':seen', 'XX', 'GT', d(now), a[i]) end
  local gone = redis.call('ZRANGEBYSCORE', P .. ':seen', '-inf', '(' .. d(now - c.session_ms),
    'LIMIT', '0', '1000')
  for _, S in ipairs(gone) do leave(P, c, now, S, true) end
  return { #gone }
end

local function dead_selected(P, ids)
  local want
  if #ids > 0 then
    want = {}
    for _, id in ipairs(ids) do want[id] = true end
  end
  local out = {}
  for _, e in ipairs(redis.call('XRANGE', P .. ':dead', '-', '+')) do
    local f = fields(e)
    if not want or want[f.i] then out[#out + 1] = { e[1], f } end
  end
  return out
end

-- P, op (list|replay|purge), then the limit (list) or ids (none: all).
-- list: {total, id, session, body, deliveries, ...}; otherwise {count}.
local function mm_dead(_, a)
  local P, op = a[1], a[2]
  local key = P .. ':dead'
  if op == 'list' then
    local out = { redis.call('XLEN', key) }
    for _, e in ipairs(redis.call('XRANGE', key, '-', '+', 'COUNT', a[3])) do
      local f = fields(e)
      out[#out + 1] = f.i
      out[#out + 1] = f.s
      out[#out + 1] = f.b
      out[#out + 1] = tonumber(f.n)
    end
    return out
  end
  local ids = {}
  for i = 3, #a do ids[#ids + 1] = a[i] end
  local selected = dead_selected(P, ids)
  if op == 'replay' then
    local c = cfg(P)
    local now = now_ms()
    local replayed = {}
    for _, s in ipairs(selected) do
      local f = s[2]
      replayed[f.s] = true
      enqueue(P, c, now, f.s, tonumber(f.i), redis.call('INCR', P .. ':id'), f.b, f.c or '',
        tonumber(f.p or '0'), expiry(c, now, nil), 0)
    end
    for S in pairs(replayed) do hand_over(P, c, now, S) end
  end
  for _, s in ipairs(selected) do redis.call('XDEL', key, s[1]) end
  return { #selected }
end

-- Visits one mailbox of the index, or takes it out when its stream has gone.
local function visit_mailbox(P, c, index, S, visit)
  local q = qkey(P, S)
  if redis.call('EXISTS', q) == 0 then
    redis.call('SREM', index, S)
  else
    local total = redis.call('XLEN', q)
    local given = pending_count(c, q)
    visit(S, total - given, given)
  end
end

-- Visits every mailbox: O(mailboxes), for operators (and mm1_status of cores from
-- before mm1_tally).
local function scan_mailboxes(P, visit)
  local c = cfg(P)
  local index = P .. ':mailboxes'
  for _, S in ipairs(redis.call('SMEMBERS', index)) do visit_mailbox(P, c, index, S, visit) end
end

-- P. {sessions, mailboxes, ready, in_flight, dead_letters, subscriptions, channels}
local function mm_status(_, a)
  local P = a[1]
  local mailboxes, ready, given = 0, 0, 0
  scan_mailboxes(P, function(_, r, g)
    mailboxes = mailboxes + 1
    ready = ready + r
    given = given + g
  end)
  local subscriptions = 0
  local patterns = redis.call('SMEMBERS', P .. ':pat')
  for _, p in ipairs(patterns) do subscriptions = subscriptions + redis.call('SCARD', P .. ':m:' .. p) end
  return { redis.call('ZCARD', P .. ':seen'), mailboxes, ready, given, redis.call('XLEN', P .. ':dead'),
    subscriptions, #patterns }
end

-- P, mailbox cursor, pattern cursor, count. What mm1_status counts, one slice of
-- each index per call (SSCAN; 'done' for an index already walked), so that no call
-- holds Redis for a walk over every mailbox (0.2 s with 100,000 of them) while
-- every scrape of every core asks. A mailbox or pattern that comes or goes meanwhile
-- may be counted or not, and one may be counted twice while Redis resizes the set:
-- gauges, not an inventory.
-- {next mailbox cursor, next pattern cursor ('0' once walked), mailboxes, ready,
--  in_flight, patterns, subscriptions, sessions, dead_letters}.
local function mm_tally(_, a)
  local P, mcur, pcur, count = a[1], a[2], a[3], a[4]
  local mailboxes, ready, given, patterns, subscriptions = 0, 0, 0, 0, 0
  if mcur ~= 'done' then
    local c = cfg(P)
    local index = P .. ':mailboxes'
    local scan = redis.call('SSCAN', index, mcur, 'COUNT', count)
    mcur = scan[1]
    for _, S in ipairs(scan[2]) do
      visit_mailbox(P, c, index, S, function(_, r, g)
        mailboxes = mailboxes + 1
        ready = ready + r
        given = given + g
      end)
    end
  end
  if pcur ~= 'done' then
    local scan = redis.call('SSCAN', P .. ':pat', pcur, 'COUNT', count)
    pcur = scan[1]
    for _, p in ipairs(scan[2]) do
      patterns = patterns + 1
      subscriptions = subscriptions + redis.call('SCARD', P .. ':m:' .. p)
    end
  end
  return { mcur, pcur, mailboxes, ready, given, patterns, subscriptions,
    redis.call('ZCARD', P .. ':seen'), redis.call('XLEN', P .. ':dead') }
end

-- P, limit. {total, then per session: session, ready, in_flight, user, last_seen_ms,
-- paused, subscriptions} deepest queues first.
local function mm_sessions(_, a)
  local P, limit = a[1], tonumber(a[2])
  local now = now_ms()
  local all = {}
  scan_mailboxes(P, function(s, r, g) all[#all + 1] = { s, r, g } end)
  table.sort(all, function(x, y)
    if x[2] ~= y[2] then return x[2] > y[2] end
    if x[3] ~= y[3] then return x[3] > y[3] end
    return x[1] < y[1]
  end)
  local out = { #all }
  for i = 1, math.min(limit, #all) do
    local s = all[i][1]
    local seen = redis.call('ZSCORE', P .. ':seen', s)
    out[#out + 1] = s
    out[#out + 1] = all[i][2]
    out[#out + 1] = all[i][3]
    out[#out + 1] = redis.call('HGET', P .. ':s:' .. s, 'user') or ''
    out[#out + 1] = seen and (now - tonumber(seen)) or -1
    out[#out + 1] = is_paused(P, s) and 1 or 0
    out[#out + 1] = redis.call('SCARD', P .. ':subs:' .. s)
  end
  return out
end

-- P, S, limit. {total, then id, age_ms, in_flight, deliveries, body per message}:
-- given out first, then ready, oldest first.
local function mm_peek(_, a)
  local P, S, limit = a[1], a[2], tonumber(a[3])
  local now = now_ms()
  local q = qkey(P, S)
  local out = { 0 }
  if redis.call('EXISTS', q) == 0 then return out end
  local listed, given = 0, {}
  local function add(e, in_flight, deliveries)
    if listed >= limit then return end
    local f = fields(e)
    listed = listed + 1
    out[#out + 1] = f.i
    out[#out + 1] = now - tonumber(f.t or d(now))
    out[#out + 1] = in_flight
    out[#out + 1] = deliveries
    out[#out + 1] = f.b
  end
  local c = cfg(P)
  for _, p in ipairs(c.ack and pending(q) or {}) do
    given[p[1]] = true
    local e = redis.call('XRANGE', q, p[1], p[1])[1]
    if e then add(e, (c.ack and p[3] < c.vis_ms) and 1 or 0, p[4]) end
  end
  for _, e in ipairs(redis.call('XRANGE', q, '-', '+')) do
    if not given[e[1]] then add(e, 0, 0) end
  end
  out[1] = redis.call('XLEN', q)
  return out
end

-- P, S. {deleted}
local function mm_purge(_, a)
  local P, S = a[1], a[2]
  local q = qkey(P, S)
  local n = redis.call('XLEN', q) + redis.call('LLEN', P .. ':back:' .. S)
  redis.call('DEL', q, P .. ':back:' .. S)
  return { n }
end

-- A Redis at maxmemory (noeviction) refuses new messages: the functions that store
-- one are refused whole and answered Overloaded. Every other function must still
-- run, or no poll could drain the mailboxes that filled it (and a message handed
-- back could not come back).
local function register(name, callback, refused_when_full)
  local flags = {}
  if not refused_when_full then flags = { 'allow-oom' } end
  redis.register_function { function_name = name, callback = callback, flags = flags }
end

register('mm1_init', mm_init)
register('mm1_poll', mm_poll)
register('mm1_publish', mm_publish, true)
register('mm1_send', mm_send, true)
register('mm1_ack', mm_ack)
register('mm1_return', mm_return)
register('mm1_release', mm_release)
register('mm1_subscribe', mm_subscribe)
register('mm1_unsubscribe', mm_unsubscribe)
register('mm1_await', mm_await)
register('mm1_pause', mm_pause)
register('mm1_presence', mm_presence)
register('mm1_bind', mm_bind)
register('mm1_kick', mm_kick)
register('mm1_sweep', mm_sweep)
register('mm1_dead', mm_dead)
register('mm1_status', mm_status)
register('mm1_tally', mm_tally)
register('mm1_sessions', mm_sessions)
register('mm1_peek', mm_peek)
register('mm1_purge', mm_purge)
