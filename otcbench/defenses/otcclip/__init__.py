"""``otcclip`` (the paper's reading) and ``otcclip+filter`` (otcbench's extension): one package, a file per job.

* :mod:`.options` — the two options models (published-reading defaults; the extension's defaults);
* :mod:`.features` — feature extractors, the per-epoch feature store, the caption pool, named per-pair stats;
* :mod:`.transport` — OT distances between token sets;
* :mod:`.matching` — candidate ranking, the caption-use cap, the pair filter;
* :mod:`.losses` — the inter/intra-modality OT losses;
* :mod:`.defense` — the hooks the trainer calls, and the registrations.
"""

from otcbench.defenses.otcclip.defense import OTCCLIP, OTCCLIPFilter
from otcbench.defenses.otcclip.matching import cap_caption_uses, rank_candidates
from otcbench.defenses.otcclip.options import OTCCLIPFilterOptions, OTCCLIPOptions

__all__ = ["OTCCLIP", "OTCCLIPFilter", "OTCCLIPFilterOptions", "OTCCLIPOptions", "cap_caption_uses",
           "rank_candidates"]
