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
      16     2  KIND (1 ring, 2 slot pool, 3 blob)
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
     273  MSGS_IN                     producers (274 unused: bytes in = TAIL)
     275  PEAK_BYTES (276 unused)     producers, sampled when re-reading HEAD
     277  FULL_WAITS, 278 FULL_WAIT_NS  producers, after a blocked write
     280  HEAD   byte position        consumers: releasing a record
     281  MSGS_OUT                    consumers (282 unused: bytes out = HEAD)
     283  EMPTY_WAITS, 284 EMPTY_WAIT_NS  consumers, after a blocked read
     288  CONSUMER_WAITING            a consumer about to sleep on "not empty"
     296  PRODUCER_WAITING            a producer about to sleep on "not full"
     304  PRODUCER_LOCK owner pid, 305 generation (bumped by recoveries:
          MSGS_IN shows this lock's progress, see _sync)
     312  CONSUMER_LOCK owner pid, 313 generation (recoveries; MSGS_OUT)
     320  (reserved)
     321  QUEUE_KIND (0: a plain ring; QUEUE_KIND_* for shmq.queue's rings,
          a service's request ring and a client's reply ring)  creator
          A queue's main ring (QUEUE_KIND_QUEUE/JOINABLE/SIMPLE):
     322  (3 words unused: the side ring's name follows from the queue's, "<queue>.s")
     325  TASKS_DONE (JoinableQueue: unfinished = MSGS_IN - TASKS_DONE)
                                      task_done(), under the side ring's PRODUCER_LOCK
     326  JOIN_WAITING                a join() about to sleep on "all done" ("-jd")
     327  POOL_CONFIG: slot pool for large buffers, SLOT_COUNT << 42 | SLOT_SIZE (0: fitted)
          (0: zero_copy=False, no pool)                       creator
          A queue's side ring (QUEUE_KIND_SIDE; records name large-item blobs):
     322  SIDE_LIMIT_BYTES            creator (blob bytes allowed in flight)
     323  SIDE_BYTES_IN               producers, under its PRODUCER_LOCK
     324  SIDE_BYTES_OUT              consumers, under its CONSUMER_LOCK
     325  POOL_MADE: 1 once the queue's slot pool "<queue>.p" exists (it is
          created on the first large buffer put, under the main ring's admin
          lock, and this word written last; 326-327 unused)  the pool's creator
     328  a service's request ring (QUEUE_KIND_SERVICE): its server table, and
          a client's reply ring (QUEUE_KIND_REPLIES): its service's name, up to
          DATA_OFFSET (see "A service" below)
     384  a channel's ring: CH_* words and its member table, up to DATA_OFFSET
          (see "A channel's member table" below)

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
KIND_BLOB = 3
KIND_NAMES = {KIND_RING: "ring", KIND_POOL: "pool", KIND_BLOB: "blob"}

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
#: puts slot messages (a queue's array producer): its death frees their slots by the orphan rule, as a consumer's does
ROLE_SLOT_WRITER = 16

W_KIND_HEADER = W_PARTICIPANTS + PARTICIPANTS * PARTICIPANT_WORDS  # 264
DATA_OFFSET = 4096

# ring header
W_CAPACITY = W_KIND_HEADER + 0
W_MAX_MESSAGES = W_KIND_HEADER + 1
W_FLAGS = W_KIND_HEADER + 2
W_TAIL = W_KIND_HEADER + 8
W_MSGS_IN = W_TAIL + 1
W_PEAK_BYTES = W_TAIL + 3
W_FULL_WAITS = W_TAIL + 5
W_FULL_WAIT_NS = W_TAIL + 6
W_HEAD = W_KIND_HEADER + 16
W_MSGS_OUT = W_HEAD + 1
W_EMPTY_WAITS = W_HEAD + 3
W_EMPTY_WAIT_NS = W_HEAD + 4
W_CONSUMER_WAITING = W_KIND_HEADER + 24
W_PRODUCER_WAITING = W_KIND_HEADER + 32
W_PRODUCER_LOCK = W_KIND_HEADER + 40
W_CONSUMER_LOCK = W_KIND_HEADER + 48
# shmq.queue's words, in the rest of the last cache line (see the map above)
W_QUEUE_KIND = W_KIND_HEADER + 57
W_TASKS_DONE = W_KIND_HEADER + 61  # main ring
W_JOIN_WAITING = W_KIND_HEADER + 62  # main ring
W_SIDE_LIMIT = W_KIND_HEADER + 58  # side ring
W_SIDE_BYTES_IN = W_KIND_HEADER + 59  # side ring
W_SIDE_BYTES_OUT = W_KIND_HEADER + 60  # side ring
W_POOL_CONFIG = W_KIND_HEADER + 63  # main ring: SLOT_COUNT << POOL_COUNT_SHIFT | SLOT_SIZE, size 0: fitted; 0 = no pool
POOL_COUNT_SHIFT = 42
W_POOL_MADE = W_KIND_HEADER + 61  # side ring: 1 once the pool "<queue>.p" exists
QUEUE_KIND_QUEUE = 1
QUEUE_KIND_JOINABLE = 2
QUEUE_KIND_SIMPLE = 3
QUEUE_KIND_SIDE = 4
W_RING_HEADER_END = W_KIND_HEADER + 64
assert W_RING_HEADER_END * WORD <= DATA_OFFSET

# A channel's member table (shmq.channel), in the last 1 KiB of its ring's
# header, past the ring's own words: who holds how many endpoints of each side.
# Written under the ring segment's admin lock (flock); CH_STATE is read without
# it (one aligned word, bits are only ever set, in one store)::
#
#   word  field
#    384  CH_TAG: CHANNEL_TAG once the table is ready (the creator, before the
#         pool that names the channel is published)
#    385  CH_STATE: CH_SENDERS_DONE | CH_SENDER_DIED | CH_RECEIVERS_DONE |
#         CH_RECEIVER_DIED (persistent: bits are set, never cleared)
#    386  CH_SENDERS: open send handles, every process (reservations included)
#    387  CH_RECEIVERS: open receive handles
#    388  CH_DEAD_SENDER: pid of the first process found dead holding a sender
#    389  CH_DEAD_RECEIVER: same for receivers
#    392  member table: CH_MEMBERS entries of CH_MEMBER_WORDS words:
#         PID (> 0: the holder; CH_RESERVED: handles pickled or forked and not
#         claimed yet; 0: free), START_US (the holder's start time; for a
#         reservation its expiry, CLOCK_MONOTONIC microseconds), HANDLES
#         (senders << 32 | receivers held through this entry)
W_CH_TAG = W_KIND_HEADER + 120  # 384
W_CH_STATE = W_CH_TAG + 1
W_CH_SENDERS = W_CH_TAG + 2
W_CH_RECEIVERS = W_CH_TAG + 3
W_CH_DEAD_SENDER = W_CH_TAG + 4
W_CH_DEAD_RECEIVER = W_CH_TAG + 5
W_CH_MEMBERS = W_CH_TAG + 8  # 392
CH_MEMBERS = 40
CH_MEMBER_WORDS = 3
CH_PID, CH_START_US, CH_HANDLES = 0, 1, 2
CH_RESERVED = -1
CH_HANDLE_SHIFT = 32
CHANNEL_TAG = int.from_bytes(b"shmqchn1", "little")
CH_SENDERS_DONE = 1  # every send handle closed (or its process died)
CH_SENDER_DIED = 2  # a process died holding a send handle: the stream was cut
CH_RECEIVERS_DONE = 4  # every receive handle closed (or its process died)
CH_RECEIVER_DIED = 8
assert W_CH_TAG >= W_RING_HEADER_END
assert (W_CH_MEMBERS + CH_MEMBERS * CH_MEMBER_WORDS) * WORD <= DATA_OFFSET


def channel_member_word(index: int) -> int:
    return W_CH_MEMBERS + index * CH_MEMBER_WORDS


# A service (shmq.service): its request ring is a ring with QUEUE_KIND_SERVICE,
# each client's reply ring one with QUEUE_KIND_REPLIES.  Both use words past
# the ring's own (a service's ring is no channel: the channel table's words
# are free), written as below; readers (shmq ls/stat/top) believe them only
# with the kind and the tag in place, and show the ring as a plain ring
# otherwise.  Every counter only grows.
#
#   request ring (QUEUE_KIND_SERVICE, written last by the creator)
#   word  field                                         written by
#    328  SV_TAG: SERVICE_TAG once the words are ready  creator
#    329  SV_SERVERS: entries in the server table        creator
#    330  SV_FOLDS: bumped before and after an entry is  under the admin lock
#         folded into SV_RETIRED (odd while folding: readers retry)
#    331  SV_LOST: calls whose server died while serving them (or after
#         reading them off the ring), counted by their clients   admin lock
#    336  SV_RETIRED: the sums of the server entries given up (a server
#         that closed, or died and whose entry was reused), entry layout
#    344  server table: SV_SERVERS entries of SV_ENTRY_WORDS words, one cache
#         line each: PID (0 free), START_US, REPLIED, FAILED, PARTIALS,
#         DROPPED (answers dropped: the client cancelled or left), SKIPPED
#         (requests cancelled before a handler saw them).  Claimed and freed
#         under the admin lock; counted by the server alone (plain stores).
#
#   reply ring (QUEUE_KIND_REPLIES, written by the client before its first request)
#    328  RP_SERVICE: the service's name, RP_SERVICE_BYTES bytes, NUL padded
#
#   a client's request table (the blob "<reply ring>.b0"; the entries from
#   DATA_OFFSET on: CL_ENTRIES of CL_ENTRY_WORDS words each)
#    265  CL_TAG: CLIENT_TAG once the table is ready
#    266  CL_RESENT: requests the client sent again      the client
#         entry words: SEQ (the correlation id; the client, before sending),
#         CANCEL (the client), PID and START (the server that took it), TAKEN
#         (= SEQ once taken), DONE (= SEQ once a server sent the final answer)
QUEUE_KIND_SERVICE = 5
QUEUE_KIND_REPLIES = 6
SERVICE_TAG = int.from_bytes(b"shmqsvc1", "little")
W_SV_TAG = W_RING_HEADER_END  # 328
W_SV_SERVERS = W_SV_TAG + 1
W_SV_FOLDS = W_SV_TAG + 2
W_SV_LOST = W_SV_TAG + 3
W_SV_RETIRED = W_SV_TAG + 8  # 336
W_SV_TABLE = W_SV_TAG + 16  # 344
SV_ENTRY_WORDS = 8
SV_PID, SV_START_US, SV_REPLIED, SV_FAILED, SV_PARTIALS, SV_DROPPED, SV_SKIPPED = range(7)
SV_COUNTER_NAMES = ("replied", "failed", "partials", "dropped", "skipped")  # words SV_REPLIED..SV_SKIPPED
SV_SERVERS = (DATA_OFFSET // WORD - W_SV_TABLE) // SV_ENTRY_WORDS  # 21
W_RP_SERVICE = W_RING_HEADER_END  # 328
RP_SERVICE_BYTES = 64
CLIENT_TAG = int.from_bytes(b"shmqcli1", "little")
W_CL_TAG = W_KIND_HEADER + 1
W_CL_RESENT = W_KIND_HEADER + 2
CL_ENTRIES = 1024
CL_ENTRY_WORDS = 8
CL_SEQ, CL_CANCEL, CL_PID, CL_START, CL_TAKEN, CL_DONE = range(6)
assert (W_SV_TABLE * WORD) % CACHE_LINE == 0
assert (W_SV_TABLE + SV_SERVERS * SV_ENTRY_WORDS) * WORD <= DATA_OFFSET
assert W_RP_SERVICE * WORD + RP_SERVICE_BYTES <= DATA_OFFSET


def service_entry_word(index: int) -> int:
    return W_SV_TABLE + index * SV_ENTRY_WORDS


FLAG_MULTI_PRODUCER = 1
FLAG_MULTI_CONSUMER = 2

RECORD_HEADER = WORD
MIN_CAPACITY = 64


def max_payload(capacity_bytes: int) -> int:
    """Largest payload a ring of ``capacity_bytes`` can ever hold."""
    return capacity_bytes - RECORD_HEADER


def ring_segment_size(capacity_bytes: int) -> int:
    return DATA_OFFSET + capacity_bytes


def participant_word(index: int) -> int:
    return W_PARTICIPANTS + index * PARTICIPANT_WORDS


# ---------------------------------------------------------------------------
# Slot pool (kind 2)
# ---------------------------------------------------------------------------
# A pool is a fixed number of fixed-size slots plus the bookkeeping that says,
# per slot, who lent it out and, per process ("member"), what it holds.  Every
# word has one writer at a time, so plain aligned int64 stores suffice::
#
#   word  field                          written by
#   ----  -----------------------------  -------------------------------------
#    264  SLOT_SIZE  bytes per slot      creator
#    265  SLOT_COUNT                     creator
#    266  MAX_MEMBERS                    creator
#    267  RQ_CAPACITY entries per return queue (power of two)   creator
#    268  SLOT_STRIDE bytes between slot starts                  creator
#    269  SLOT_TABLE   byte offset       creator
#    270  MEMBER_TABLE byte offset       creator
#    271  HOLD_TABLE   byte offset       creator
#    272  RETURN_QUEUES byte offset      creator
#    273  SLOT_DATA    byte offset       creator (page aligned)
#    280  LINK: 32 bytes, name of the ring the pool serves (or zeros)
#    288  POOL_LOCK owner pid, 289 generation (RobustLock "-rl")
#    296  FREE_COUNT  free slots (a hint; recounted by reclaim)   under POOL_LOCK
#    297  ALLOC_HINT  where the next free-slot search starts     under POOL_LOCK
#    298  MEMBERS_HIGH  1 + highest member entry ever used       under admin lock
#    304  RETURN_WAITING  a source is about to sleep on "slot returned"
#    312  counters: ALLOCATIONS, FREES, RETURNS, RECLAIMED, ORPHANED,
#         CORRUPT_RETURNS, LOST_RETURNS                           under POOL_LOCK
#
# Tables, from SLOT_TABLE on (byte offsets in the header above):
#
#   slot table    SLOT_COUNT records of SLOT_WORDS words:
#                 STATE (FREE/LOANED/SENT), GEN (bumped at each allocation),
#                 OWNER (member index + 1 of the source), NBYTES, DELIVERIES
#                 (holds to expect), FENCE (ring position the message ends
#                 before, 0 = unknown).  Written by the owner (or a janitor
#                 once the owner is dead); STATE last.
#   member table  MAX_MEMBERS records of MEMBER_WORDS words: PID, START_US,
#                 STATE (FREE/LIVE/DEAD), RQ_HEAD (owner), RQ_TAIL (pushers,
#                 under POOL_LOCK), RQ_LOST (a notification did not fit),
#                 REUSES (slots the member loaned again straight from a
#                 return, counted in ALLOCATIONS and FREES once the entry
#                 is recycled).
#   hold table    MAX_MEMBERS x SLOT_COUNT words.  Word [m][s] counts the
#                 current generation's holds of slot s by member m:
#                 acquired << 32 | released.  Only member m writes it (a
#                 janitor never does; the freeing source zeroes it).
#   return queues MAX_MEMBERS x RQ_CAPACITY words: notifications
#                 gen << 32 | slot for the slot's source, pushed by the
#                 holder that released it.
#   slot data     SLOT_COUNT x SLOT_STRIDE bytes.
W_SLOT_SIZE = W_KIND_HEADER + 0
W_SLOT_COUNT = W_KIND_HEADER + 1
W_MAX_MEMBERS = W_KIND_HEADER + 2
W_RQ_CAPACITY = W_KIND_HEADER + 3
W_SLOT_STRIDE = W_KIND_HEADER + 4
W_SLOT_TABLE = W_KIND_HEADER + 5
W_MEMBER_TABLE = W_KIND_HEADER + 6
W_HOLD_TABLE = W_KIND_HEADER + 7
W_RETURN_QUEUES = W_KIND_HEADER + 8
W_SLOT_DATA = W_KIND_HEADER + 9
W_LINK = W_KIND_HEADER + 16
LINK_BYTES = 32
W_POOL_LOCK = W_KIND_HEADER + 24
W_FREE_COUNT = W_KIND_HEADER + 32
W_ALLOC_HINT = W_KIND_HEADER + 33
W_MEMBERS_HIGH = W_KIND_HEADER + 34
W_RETURN_WAITING = W_KIND_HEADER + 40
W_POOL_COUNTERS = W_KIND_HEADER + 48
POOL_COUNTER_NAMES = (
    "allocations", "frees", "returns", "reclaimed", "orphaned", "corrupt_returns", "lost_returns",
)
W_POOL_HEADER_END = W_POOL_COUNTERS + 8
assert W_POOL_HEADER_END * WORD <= DATA_OFFSET

SLOT_WORDS = 8
S_STATE, S_GEN, S_OWNER, S_NBYTES, S_DELIVERIES, S_FENCE = 0, 1, 2, 3, 4, 5
SLOT_FREE, SLOT_LOANED, SLOT_SENT = 0, 1, 2
SLOT_STATE_NAMES = {SLOT_FREE: "free", SLOT_LOANED: "loaned", SLOT_SENT: "sent"}

MEMBER_WORDS = 8
M_PID, M_START_US, M_STATE, M_RQ_HEAD, M_RQ_TAIL, M_RQ_LOST, M_REUSES = 0, 1, 2, 3, 4, 5, 6
MEMBER_FREE, MEMBER_LIVE, MEMBER_DEAD = 0, 1, 2

HOLD_ACQUIRE = 1 << 32
HOLD_RELEASED_MASK = HOLD_ACQUIRE - 1

PAGE = 4096
MAX_SLOT_COUNT = 1 << 20
MAX_POOL_MEMBERS = 1024


def _align(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def slot_stride(slot_size: int) -> int:
    """Bytes between slot starts: cache-line aligned, page aligned from 4 KiB up."""
    return _align(slot_size, PAGE if slot_size >= PAGE else CACHE_LINE)


def return_queue_capacity(slot_count: int) -> int:
    """Entries per member's return queue: a power of two >= 2 * slot_count."""
    cap = 16
    while cap < 2 * slot_count:
        cap *= 2
    return cap


def pool_geometry(slot_size: int, slot_count: int, max_members: int) -> dict:
    """Byte offsets of a pool's tables and its total segment size."""
    stride = slot_stride(slot_size)
    rq = return_queue_capacity(slot_count)
    slot_table = DATA_OFFSET
    member_table = slot_table + slot_count * SLOT_WORDS * WORD
    hold_table = member_table + max_members * MEMBER_WORDS * WORD
    return_queues = hold_table + max_members * slot_count * WORD
    data = _align(return_queues + max_members * rq * WORD, PAGE)
    return {
        "stride": stride,
        "rq_capacity": rq,
        "slot_table": slot_table,
        "member_table": member_table,
        "hold_table": hold_table,
        "return_queues": return_queues,
        "data": data,
        "size": data + slot_count * stride,
    }


# ---------------------------------------------------------------------------
# Blob (kind 3): one large queue item, created by the producer, named by a
# record in the queue's side ring, unlinked by the consumer that takes it.
# The creator words name the queue's creator, not the producer, so `shmq gc`
# keeps the blob as long as the queue lives.
#
#   word  field
#    264  BLOB_BYTES: payload length; the payload starts at DATA_OFFSET
# ---------------------------------------------------------------------------
W_BLOB_BYTES = W_KIND_HEADER + 0


def blob_segment_size(payload_bytes: int) -> int:
    return DATA_OFFSET + ((payload_bytes + WORD - 1) & -WORD)


# ---------------------------------------------------------------------------
# Topic (kind 4): a broadcast ring (shmq.Topic, shmq._broadcast).  Every
# record is written once; every subscriber has its own cursor in the
# subscriber table.  The data area starts at TOPIC_DATA_OFFSET (the tables do
# not fit below DATA_OFFSET).  Records: LENGTH word (payload bytes; a pad that
# fills the end of the data area has minus its total length, and no SEQ),
# SEQ word (the message number, 0, 1, 2, ... in publishing order), payload
# padded to 8.  Records never wrap.
#
#   word  field                                   written by
#    264  T_CAPACITY bytes of the data area       creator
#    265  T_FLAGS (T_DROP_OLDEST)                 creator
#    266  T_SLOT_CONFIG slot_count << 42 | slot_size (recorded, unused yet)
#    272  T_TAIL byte position after the newest record  publishers (last store)
#    273  T_NEXT_SEQ sequence number of the next record  publishers
#    274  T_OLDEST position of the oldest record still intact: a publisher
#         moves it past every record it is about to overwrite BEFORE it
#         writes a byte (readers validate against it after copying)
#    275  T_OLDEST_SEQ its sequence number          publishers, under the lock
#    276  T_EPOCH bumped by every subscribe (publishers re-scan cursors)
#    280  T_PUB_WAITING a publisher sleeps on "not full" ("-nf")
#    288  T_SUB_WAITING some subscriber sleeps on "not empty" ("-ne")
#    296  T_PRODUCER_LOCK owner pid, 297 generation (RobustLock "-pl")
#    304  T_STATE T_PUBLISHERS_DONE | T_PUBLISHER_DIED (bits only set)
#    305  T_PUBLISHERS open publisher handles (reservations included)
#    306  T_DEAD_PUBLISHER pid of the first publisher found dead
#    312  publisher table: T_PUB_MEMBERS entries of 3 words, as a channel's
#         member table: PID (0 free), START_US, HANDLES (1: one counted
#         publisher handle per entry)
#    512  subscriber table: T_SUBSCRIBERS entries of T_SUB_WORDS words:
#         PID (0 free), START_US, CURSOR (position of the next record to
#         read), NEXT_SEQ (its expected sequence number), LOST, WAITING,
#         RECEIVED; only the subscription writes its entry once live
#         (a janitor frees a dead one: PID 0)
#   1024  data area (TOPIC_DATA_OFFSET = 8192)
# ---------------------------------------------------------------------------
KIND_TOPIC = 4
KIND_LATEST = 5
KIND_NAMES[KIND_TOPIC] = "topic"
KIND_NAMES[KIND_LATEST] = "latest"

W_T_CAPACITY = W_KIND_HEADER + 0
W_T_FLAGS = W_KIND_HEADER + 1
W_T_SLOT_CONFIG = W_KIND_HEADER + 2
W_T_TAIL = W_KIND_HEADER + 8
W_T_NEXT_SEQ = W_KIND_HEADER + 9
W_T_OLDEST = W_KIND_HEADER + 10
W_T_OLDEST_SEQ = W_KIND_HEADER + 11
W_T_EPOCH = W_KIND_HEADER + 12
W_T_PUB_WAITING = W_KIND_HEADER + 16
W_T_SUB_WAITING = W_KIND_HEADER + 24
W_T_PRODUCER_LOCK = W_KIND_HEADER + 32
W_T_STATE = W_KIND_HEADER + 40
W_T_PUBLISHERS = W_KIND_HEADER + 41
W_T_DEAD_PUBLISHER = W_KIND_HEADER + 42
W_T_PUB_TABLE = W_KIND_HEADER + 48  # 312
T_PUB_MEMBERS = 32
T_PUB_WORDS = 3
W_T_SUB_TABLE = 512
T_SUBSCRIBERS = 64
T_SUB_WORDS = 8
TS_PID, TS_START_US, TS_CURSOR, TS_NEXT_SEQ, TS_LOST, TS_WAITING, TS_RECEIVED = 0, 1, 2, 3, 4, 5, 6
TOPIC_DATA_OFFSET = 8192
T_DROP_OLDEST = 1
T_PUBLISHERS_DONE = 1
T_PUBLISHER_DIED = 2
T_RECORD_HEADER = 2 * WORD
assert W_T_PUB_TABLE + T_PUB_MEMBERS * T_PUB_WORDS <= W_T_SUB_TABLE
assert (W_T_SUB_TABLE + T_SUBSCRIBERS * T_SUB_WORDS) * WORD <= TOPIC_DATA_OFFSET


def topic_pub_word(index: int) -> int:
    return W_T_PUB_TABLE + index * T_PUB_WORDS


def topic_sub_word(index: int) -> int:
    return W_T_SUB_TABLE + index * T_SUB_WORDS


def topic_segment_size(capacity_bytes: int) -> int:
    return TOPIC_DATA_OFFSET + capacity_bytes


# ---------------------------------------------------------------------------
# Latest (kind 5): the newest value (shmq.Latest), in LATEST_BUFFERS buffers
# used in turn; version v lives in buffer v % LATEST_BUFFERS.  A setter marks
# the buffer's SEQ 0, writes LENGTH and the bytes, stores SEQ = v, then
# VERSION = v (the publishing store).  A reader takes VERSION, copies buffer
# v % LATEST_BUFFERS and keeps the copy only if SEQ was v before and after.
#
#   word  field
#    264  L_CAPACITY bytes per buffer
#    272  L_VERSION newest complete version (0: never set)
#    280  L_WAITERS readers sleeping in wait() (under the admin lock)
#    296  L_WRITER_LOCK owner pid, 297 generation (RobustLock "-pl")
#    265  L_SLOT_CONFIG SLOT_COUNT << POOL_COUNT_SHIFT | SLOT_SIZE of the
#         slot pool "<name>.p" (0: none)                             creator
#    304  buffer headers: LATEST_BUFFERS x (SEQ, LENGTH)
#    312  reader table: L_READERS entries of L_READER_WORDS words: PID (0
#         free), START_US, PIN (the version whose slots the reader is about
#         to take; 0 none); only its reader writes an entry once live (a
#         writer frees a dead one: PID 0)
#    512  buffers (LATEST_DATA_OFFSET = 4096), each L_CAPACITY bytes
# ---------------------------------------------------------------------------
W_L_CAPACITY = W_KIND_HEADER + 0
W_L_VERSION = W_KIND_HEADER + 8
W_L_WAITERS = W_KIND_HEADER + 16
W_L_WRITER_LOCK = W_KIND_HEADER + 32
W_L_BUFFERS = W_KIND_HEADER + 40
W_L_SLOT_CONFIG = W_KIND_HEADER + 1
W_L_READERS = W_KIND_HEADER + 48  # 312
L_READERS = 64
L_READER_WORDS = 3
LR_PID, LR_START_US, LR_PIN = 0, 1, 2
LATEST_BUFFERS = 3
LATEST_DATA_OFFSET = DATA_OFFSET
assert W_L_BUFFERS + 2 * LATEST_BUFFERS <= W_L_READERS
assert (W_L_READERS + L_READERS * L_READER_WORDS) * WORD <= LATEST_DATA_OFFSET


def latest_reader_word(index: int) -> int:
    return W_L_READERS + index * L_READER_WORDS


def latest_segment_size(capacity_bytes: int) -> int:
    return LATEST_DATA_OFFSET + LATEST_BUFFERS * capacity_bytes
