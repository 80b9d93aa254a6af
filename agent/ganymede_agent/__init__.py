"""The Ganymede GEO agent: standard library and pymysql only.

It runs on GEO servers that have nothing else installed, so nothing here may
import luigi, tornado, pymongo, boto3 or the ganymede server package.
"""
__version__ = "0.1.0"
