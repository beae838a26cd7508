"""The merge engine: sources, methods, planning, writing (see DESIGN.md)."""

from evomerge.pkgcall import callable_package

callable_package(__name__, "evomerge.api:merge")  # `evomerge.merge(recipe, out)`
