"""Writing one request's events of a flush: in order, and nothing from the first refused seq on.

Event `seq` goes to stream id `0-<seq+1>`; Redis refuses an id that is not above the stream's
top, so a second write of a seq fails (fencing: another worker owns the request now). In a plain
pipeline the later XADDs of that request (its `done` among them) would still land, above the other
worker's events. One script per request's events stream runs them in order and stops at the first
refusal. One key per script, so it stays within one Redis Cluster slot.

The script also refuses to leave a gap: the first event of a write must follow the stream's event
of the seq before it. After a Sentinel failover the promoted replica may lack the last events the
old master acknowledged (replication is asynchronous); an event written after them would hide the
loss from a consumer that reads the stream later. The worker drops such a request like a fenced
one; its entry's lease runs out and a worker reclaims it and resumes from the events that exist.
"""

from __future__ import annotations

from typing import Any

from producer.protocol import event_stream_id

# KEYS[1]: the events stream. ARGV: is_resend (1/0), ttl_s (0: no EXPIRE), then per event:
# stream id, number of field/value items n, the n items.
# Returns {number of events written (or already there), 1 when all were, 0 when one was refused,
# 2 when nothing was written because the event before the first one is missing (a gap)};
# any other error (OOM under noeviction, WRONGTYPE) is returned as the error it is.
# A resend (the reply of an earlier try was lost) may find its own events already written: a
# refused id whose entry holds exactly these fields counts as written.
EVENTS_LUA = """
local function is_same_entry(key, id, first, n)
  local found = redis.call('XRANGE', key, id, id)
  if #found == 0 or #found[1][2] ~= n then return false end
  for j = 1, n do
    if found[1][2][j] ~= ARGV[first + j - 1] then return false end
  end
  return true
end

local is_resend = ARGV[1] == '1'
local first = tonumber(string.sub(ARGV[3] or '0-1', 3))  -- id 0-N holds seq N-1
if first > 1 then
  local before = '0-' .. (first - 1)
  if #redis.call('XRANGE', KEYS[1], before, before) == 0 then return {0, 2} end
end
local i, num_written = 3, 0
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 1])
  local reply = redis.pcall('XADD', KEYS[1], id, unpack(ARGV, i + 2, i + 1 + n))
  if type(reply) == 'table' and reply.err then
    if not string.find(reply.err, 'equal or smaller', 1, true) then return reply end
    if not (is_resend and is_same_entry(KEYS[1], id, i + 2, n)) then return {num_written, 0} end
  end
  num_written = num_written + 1
  i = i + 2 + n
end
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return {num_written, 1}
"""


def events_script_args(events: list[tuple[int, dict[str, Any]]], is_resend: bool, ttl_s: int) -> list[Any]:
    """ARGV for EVENTS_LUA from (seq, encoded fields) in seq order; ttl_s 0 leaves the TTL alone."""
    args: list[Any] = [1 if is_resend else 0, ttl_s]
    for seq, fields in events:
        args += [event_stream_id(seq), 2 * len(fields)]
        for name, value in fields.items():
            args += [name, value]
    return args


def is_refused(reply: Any) -> bool:
    """Whether EVENTS_LUA stopped at a refused id (the request belongs to another worker now) or at a gap."""
    return int(reply[1]) != 1


def is_gap(reply: Any) -> bool:
    """Whether EVENTS_LUA wrote nothing because the events before this write are missing (lost in a failover)."""
    return int(reply[1]) == 2
