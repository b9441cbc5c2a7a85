"""Defending a sharded safetensors checkpoint tensor by tensor (defend): shard reading and writing
(shards), the native plan (native) and the resumable staging directory (resume).
"""
