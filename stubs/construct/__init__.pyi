# Stubs for construct 2.10.x: the part of its API that improto (and its tests) use.
from construct.core import Bytes as Bytes
from construct.core import CodeGen as CodeGen
from construct.core import Compiled as Compiled
from construct.core import Construct as Construct
from construct.core import ConstructError as ConstructError
from construct.core import Error as Error
from construct.core import ExplicitError as ExplicitError
from construct.core import FormatField as FormatField
from construct.core import FormatFieldError as FormatFieldError
from construct.core import Int8ub as Int8ub
from construct.core import Int16ub as Int16ub
from construct.core import Int32ub as Int32ub
from construct.core import Int64ub as Int64ub
from construct.core import PascalString as PascalString
from construct.core import Renamed as Renamed
from construct.core import SizeofError as SizeofError
from construct.core import StreamError as StreamError
from construct.core import StringError as StringError
from construct.core import Struct as Struct
from construct.core import Subconstruct as Subconstruct
from construct.core import Switch as Switch
from construct.core import SwitchError as SwitchError
from construct.core import stream_read as stream_read
from construct.core import stream_write as stream_write
from construct.expr import Path as Path
from construct.expr import this as this
from construct.lib.containers import Container as Container
from construct.version import version as version
from construct.version import version_string as version_string

__version__: str
