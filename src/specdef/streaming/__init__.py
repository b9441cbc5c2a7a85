"""Defending a sharded safetensors checkpoint tensor by tensor (defend): shard reading and writing
(shards), reading ahead and writing in the background (overlap), the native plan (native) and the
resumable staging directory (resume).
"""
