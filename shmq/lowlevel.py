"""The building blocks under shmq's public API, for code that needs them."""
from ._layout import LAYOUT_VERSION as LAYOUT_VERSION
from ._ring import RingBuffer as RingBuffer
from ._segment import Participant as Participant
from ._segment import Segment as Segment
from ._stats import ParticipantInfo as ParticipantInfo
from ._stats import RingStatistics as RingStatistics

__all__ = ("LAYOUT_VERSION", "Participant", "ParticipantInfo", "RingBuffer", "RingStatistics", "Segment")
