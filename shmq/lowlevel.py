"""The building blocks under shmq's public API, for code that needs them."""
from ._codec import Codec as Codec
from ._codec import RingFence as RingFence
from ._layout import LAYOUT_VERSION as LAYOUT_VERSION
from ._ring import CORE as CORE
from ._ring import RingBuffer as RingBuffer
from ._segment import Participant as Participant
from ._segment import Segment as Segment
from ._segment import SegmentView as SegmentView
from ._slots import SlotInfo as SlotInfo
from ._slots import SlotPool as SlotPool
from ._slots import SlotPoolStatistics as SlotPoolStatistics
from ._stats import Garbage as Garbage
from ._segment import ParticipantInfo as ParticipantInfo
from ._stats import Rates as Rates
from ._ring import RingStatistics as RingStatistics
from ._stats import SegmentInfo as SegmentInfo
from ._stats import collect_garbage as collect_garbage
from ._stats import list_segments as list_segments
from ._stats import rates as rates
from ._stats import read_statistics as read_statistics
from ._stats import segment_info as segment_info
from ._stats import verdict as verdict

__all__ = (
    "CORE",
    "Codec",
    "RingFence",
    "SlotInfo",
    "SlotPool",
    "SlotPoolStatistics",
    "LAYOUT_VERSION",
    "Garbage",
    "Participant",
    "ParticipantInfo",
    "Rates",
    "RingBuffer",
    "RingStatistics",
    "Segment",
    "SegmentInfo",
    "SegmentView",
    "collect_garbage",
    "list_segments",
    "rates",
    "read_statistics",
    "segment_info",
    "verdict",
)
