"""Read the stack file, the catalog and the key, and plan the services: what `up` and the
supervisor both start from."""

from __future__ import annotations

import platform

from mlx_stack.catalog import load_catalog
from mlx_stack.paths import StatePaths
from mlx_stack.policy import WatchSettings
from mlx_stack.proxykey import read_key
from mlx_stack.services import Plan, plan_services
from mlx_stack.stackfile import Stack, load_stack


def load_stack_for(paths: StatePaths) -> Stack:
    return load_stack(paths.stack_file, load_catalog(paths.user_catalog), platform.system())


def load_plan(paths: StatePaths) -> tuple[Plan, WatchSettings]:
    stack = load_stack_for(paths)
    key = read_key(paths.key_file(stack.proxy.key_file))
    return plan_services(stack, paths, key), stack.watchdog
