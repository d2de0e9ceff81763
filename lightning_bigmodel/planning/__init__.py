"""Planning: sizes, budgets and device maps. Pure: reads names, shapes and dtypes; never moves a tensor."""

from lightning_bigmodel.planning.budget import get_max_memory
from lightning_bigmodel.planning.device_map import (
    POLICIES,
    Policy,
    check_device_map,
    check_devices_exist,
    clean_device_map,
    infer_device_map,
    tensor_devices,
)
from lightning_bigmodel.planning.devices import Device, DeviceMap, execution_device, normalize_device
from lightning_bigmodel.planning.sizes import compute_module_sizes, find_tied_parameters, parse_size

__all__ = [
    "POLICIES",
    "Device",
    "DeviceMap",
    "Policy",
    "check_device_map",
    "check_devices_exist",
    "clean_device_map",
    "compute_module_sizes",
    "execution_device",
    "find_tied_parameters",
    "get_max_memory",
    "infer_device_map",
    "normalize_device",
    "parse_size",
    "tensor_devices",
]
