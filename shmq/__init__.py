"""shmq: message passing between processes through shared memory."""
from ._errors import BrokenError as BrokenError
from ._errors import ClosedError as ClosedError
from ._errors import Empty as Empty
from ._errors import EndOfChannel as EndOfChannel
from ._errors import Full as Full
from ._errors import LayoutError as LayoutError
from ._errors import MessageTooLarge as MessageTooLarge
from ._errors import SharedMemoryFull as SharedMemoryFull
from ._errors import ShmqError as ShmqError
from ._errors import SlotError as SlotError
from ._errors import TooManyMembers as TooManyMembers
from ._errors import WouldBlock as WouldBlock
from ._errors import NoFreeName as NoFreeName
from ._errors import CorruptError as CorruptError
from .channel import ChannelStatistics as ChannelStatistics
from .channel import ReceiveChannel as ReceiveChannel
from .channel import ReceiveLoan as ReceiveLoan
from .channel import SendChannel as SendChannel
from .channel import SendLoan as SendLoan
from .channel import attach_channel as attach_channel
from .channel import open_channel as open_channel
from .ring import Ring as Ring
from .queue import JoinableQueue as JoinableQueue
from .queue import Queue as Queue
from .queue import SimpleQueue as SimpleQueue
from .topic import Latest as Latest
from .topic import LatestStatistics as LatestStatistics
from .topic import SubscriberStatistics as SubscriberStatistics
from .topic import Subscription as Subscription
from .topic import Topic as Topic
from .topic import TopicStatistics as TopicStatistics
from ._errors import RemoteError as RemoteError
from .service import ClientStatistics as ClientStatistics
from .service import Service as Service
from .service import ServerStatistics as ServerStatistics
from .service import ServiceStatistics as ServiceStatistics
from ._errors import WorkerDied as WorkerDied
from .pipeline import DeadLetter as DeadLetter
from .pipeline import Pipeline as Pipeline
from .pipeline import PipelineStatistics as PipelineStatistics
from .pipeline import StageStatistics as StageStatistics

from . import lowlevel as lowlevel  # (its import also installs the SHMQ_SWEEP sweeper)

__version__ = "0.1.0"

__all__ = (
    "ChannelStatistics",
    "ReceiveChannel",
    "ReceiveLoan",
    "SendChannel",
    "SendLoan",
    "attach_channel",
    "open_channel",
    "BrokenError",
    "ClosedError",
    "Empty",
    "EndOfChannel",
    "Full",
    "JoinableQueue",
    "LayoutError",
    "MessageTooLarge",
    "Queue",
    "Ring",
    "SharedMemoryFull",
    "ShmqError",
    "SimpleQueue",
    "SlotError",
    "TooManyMembers",
    "WouldBlock",
    "NoFreeName",
    "Latest",
    "LatestStatistics",
    "SubscriberStatistics",
    "Subscription",
    "Topic",
    "TopicStatistics",
    "RemoteError",
    "Service",
    "ServiceStatistics",
    "ServerStatistics",
    "ClientStatistics",
    "__version__",
    "CorruptError",
    "WorkerDied",
    "DeadLetter",
    "Pipeline",
    "PipelineStatistics",
    "StageStatistics",
)
