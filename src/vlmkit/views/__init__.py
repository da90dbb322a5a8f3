"""Image views: how an image becomes the tower's views and its tokens (``single``; see docs/high-resolution.md).

Adding a strategy is one module with its options, :class:`Views` and :class:`Assembler`, registered in
:data:`VIEWS`, plus its import here.
"""

from vlmkit.views import (
    anyres,  # noqa: F401  - registers itself
    hd,  # noqa: F401  - registers itself
    single,  # noqa: F401  - registers itself
)
from vlmkit.views.base import (
    VIEWS,
    Assembler,
    Geometry,
    Size,
    Views,
    ViewsConfig,
    ViewsSpec,
    build_assembler,
    build_views,
    projector_in,
    views_to_dict,
)

__all__ = [
    "VIEWS",
    "Assembler",
    "Geometry",
    "Size",
    "Views",
    "ViewsConfig",
    "ViewsSpec",
    "build_assembler",
    "build_views",
    "projector_in",
    "views_to_dict",
]
