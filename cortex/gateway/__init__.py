"""Cortex's gateway: one OpenAI-compatible endpoint in front of every engine replica."""

from .client import GatewayClient, GatewayError

__all__ = ["GatewayClient", "GatewayError"]
