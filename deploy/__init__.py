"""Preparing a deployment, run by bootstrap.sh and the Dockerfile before the worker starts.

provision.py           voices, model lookup and download, disk checks, progress lines
hub_cache.py           a model in a Hugging Face cache, found without the network
convert_checkpoint.py  a community-layout checkpoint into the transformers-native layout
"""
