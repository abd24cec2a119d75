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
from ._errors import WouldBlock as WouldBlock
from .ring import Ring as Ring

__version__ = "0.1.0"

__all__ = (
    "BrokenError",
    "ClosedError",
    "Empty",
    "EndOfChannel",
    "Full",
    "LayoutError",
    "MessageTooLarge",
    "Ring",
    "SharedMemoryFull",
    "ShmqError",
    "SlotError",
    "WouldBlock",
    "__version__",
)
