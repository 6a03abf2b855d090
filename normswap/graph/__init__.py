"""Graph analysis with torch.fx: relations the module tree does not show."""

from .relations import FUNCTIONAL_FAMILY, FUNCTIONAL_NORMS, FunctionalCall, Relations, find_relations
from .tracing import Region, TraceResult, trace_regions

__all__ = ["FUNCTIONAL_FAMILY", "FUNCTIONAL_NORMS", "FunctionalCall", "Region", "Relations", "TraceResult", "find_relations",
           "trace_regions"]
