"""Byte map of every shmq segment.  Pure constants and arithmetic, no I/O.

All multi-byte fields are native-endian int64 *words*, read and written through
``memoryview.cast('q')``: an aligned 8-byte store through a memoryview is a
single machine store, so a concurrent reader never sees it torn.  (``struct``
is never used for live fields: ``pack_into`` zeroes the bytes before writing
them, and a reader was measured seeing the zeros.)

Segment = common header | kind-specific header | data::

    byte  word  field
    ----  ----  -----------------------------------------------------------
       0     0  MAGIC (8 bytes, b"\\x89SHMQ\\r\\n\\x00"), written last at creation
       8     1  LAYOUT_VERSION
      16     2  KIND (1 ring, 2 slot pool)
      24     3  SIZE: total bytes of the segment
      32     4  CREATOR_PID
      40     5  CREATOR_START_US: creator's process start time, microseconds
      48     6  CREATED_NS: wall clock at creation (time.time_ns)
      56     7  (reserved)
      64     8  participants table: PARTICIPANTS entries of 4 words each
                (pid, start time in us, role bits, reserved); pid 0 = free
    2112   264  kind-specific header (see below), up to DATA_OFFSET
    4096        data area

Ring header (kind 1).  Each group sits on its own 64-byte cache line so the
producer side and the consumer side never write the same line::

    word  field                       written by
    ----  --------------------------  -------------------------------------
     264  CAPACITY_BYTES              creator (data area size, multiple of 8)
     265  MAX_MESSAGES (0 = no limit) creator
     266  FLAGS (MULTI_PRODUCER|...)  creator
     272  TAIL   byte position        producers: publishing a record
     273  MSGS_IN, 274 BYTES_IN       producers (payload bytes)
     275  PEAK_BYTES, 276 PEAK_MSGS   producers
     277  FULL_WAITS, 278 FULL_WAIT_NS  producers, after a blocked write
     280  HEAD   byte position        consumers: releasing a record
     281  MSGS_OUT, 282 BYTES_OUT     consumers
     283  EMPTY_WAITS, 284 EMPTY_WAIT_NS  consumers, after a blocked read
     288  CONSUMER_WAITING            a consumer about to sleep on "not empty"
     296  PRODUCER_WAITING            a producer about to sleep on "not full"
     304  PRODUCER_LOCK owner pid, 305 generation
     312  CONSUMER_LOCK owner pid, 313 generation
     320  WRITERS_CLOSED              set once no more records will come

TAIL and HEAD only grow; ``position % CAPACITY_BYTES`` is the offset in the
data area.  A record is one header word followed by its payload, padded to a
multiple of 8 bytes.  The header word is the payload length (>= 0), or, for a
*pad* record that fills the end of the data area so the next record can start
at offset 0, minus the pad's total length.  Records never wrap, so every
payload is one contiguous slice a reader can view in place.
"""
from __future__ import annotations

MAGIC = b"\x89SHMQ\r\n\x00"
LAYOUT_VERSION = 1

KIND_RING = 1
KIND_POOL = 2
KIND_NAMES = {KIND_RING: "ring", KIND_POOL: "pool"}

WORD = 8
CACHE_LINE = 64

# common header
W_MAGIC = 0
W_VERSION = 1
W_KIND = 2
W_SIZE = 3
W_CREATOR_PID = 4
W_CREATOR_START_US = 5
W_CREATED_NS = 6

PARTICIPANTS = 64
PARTICIPANT_WORDS = 4
W_PARTICIPANTS = 8
P_PID, P_START_US, P_ROLE = 0, 1, 2
ROLE_ATTACHED = 1
ROLE_PRODUCER = 2
ROLE_CONSUMER = 4
ROLE_CREATOR = 8

W_KIND_HEADER = W_PARTICIPANTS + PARTICIPANTS * PARTICIPANT_WORDS  # 264
DATA_OFFSET = 4096

# ring header
W_CAPACITY = W_KIND_HEADER + 0
W_MAX_MESSAGES = W_KIND_HEADER + 1
W_FLAGS = W_KIND_HEADER + 2
W_TAIL = W_KIND_HEADER + 8
W_MSGS_IN = W_TAIL + 1
W_BYTES_IN = W_TAIL + 2
W_PEAK_BYTES = W_TAIL + 3
W_PEAK_MSGS = W_TAIL + 4
W_FULL_WAITS = W_TAIL + 5
W_FULL_WAIT_NS = W_TAIL + 6
W_HEAD = W_KIND_HEADER + 16
W_MSGS_OUT = W_HEAD + 1
W_BYTES_OUT = W_HEAD + 2
W_EMPTY_WAITS = W_HEAD + 3
W_EMPTY_WAIT_NS = W_HEAD + 4
W_CONSUMER_WAITING = W_KIND_HEADER + 24
W_PRODUCER_WAITING = W_KIND_HEADER + 32
W_PRODUCER_LOCK = W_KIND_HEADER + 40
W_CONSUMER_LOCK = W_KIND_HEADER + 48
W_WRITERS_CLOSED = W_KIND_HEADER + 56
W_RING_HEADER_END = W_KIND_HEADER + 64
assert W_RING_HEADER_END * WORD <= DATA_OFFSET

FLAG_MULTI_PRODUCER = 1
FLAG_MULTI_CONSUMER = 2

RECORD_HEADER = WORD
MIN_CAPACITY = 64


def record_size(payload_bytes: int) -> int:
    """Bytes a record of ``payload_bytes`` occupies in the ring (header + padding)."""
    return (payload_bytes + 15) & ~7


def max_payload(capacity_bytes: int) -> int:
    """Largest payload a ring of ``capacity_bytes`` can ever hold."""
    return capacity_bytes - RECORD_HEADER


def ring_segment_size(capacity_bytes: int) -> int:
    return DATA_OFFSET + capacity_bytes


def participant_word(index: int) -> int:
    return W_PARTICIPANTS + index * PARTICIPANT_WORDS
