"""DeviceMapCallback (placeholder until the Lightning integration lands)."""


class DeviceMapCallback:  # pragma: no cover - replaced by the integration
    def __init__(self, *args, **kwargs):
        raise NotImplementedError
