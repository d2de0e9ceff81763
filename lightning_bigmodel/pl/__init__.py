"""The Lightning side: strategies, callback, checkpoint IO, loader, CLI, prediction writers and gathering.

Everything here may import Lightning; nothing in the core (the rest of the package) imports this subpackage.
Importing it registers ``strategy="bigmodel"`` and ``strategy="bigmodel_replicas"`` with Lightning.
"""

from lightning_bigmodel.pl import replicas, strategy  # noqa: F401  (each registers its strategy name)
from lightning_bigmodel.pl._quiet import quiet_banners

quiet_banners()  # the noise our imports and Lightning's tips add to a job's output, as the command drops it
