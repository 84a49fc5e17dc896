from collections import OrderedDict
from typing import Any

class Container(OrderedDict[str, Any]):
    """A dict whose keys are also attributes: what a Struct parses into.

    Its values are whatever the fields parse into, so they are typed `Any`.
    """

    def __getattr__(self, name: str) -> Any: ...
    def __setattr__(self, name: str, value: Any) -> None: ...
