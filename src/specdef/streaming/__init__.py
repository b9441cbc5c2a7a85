"""Defending a sharded safetensors checkpoint tensor by tensor: shard reading and writing,
the native plan, and the resumable staging directory.
"""
