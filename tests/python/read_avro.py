"""Reads Confluent-framed Avro feature records from a topic with the clients users have:
confluent-kafka for Kafka and fastavro for the datum, fetching the writer schema by id from
the registry. Prints one JSON object per record.

usage: read_avro.py BROKERS TOPIC REGISTRY_URL COUNT
"""
import io
import json
import struct
import sys
import urllib.request

import fastavro
from confluent_kafka import Consumer


def main() -> int:
    brokers, topic, registry, count = sys.argv[1], sys.argv[2], sys.argv[3].rstrip("/"), int(sys.argv[4])
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"avro-reader-{topic}", "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    schemas = {}
    out = 0
    idle = 0
    while out < count and idle < 100:
        msg = consumer.poll(0.2)
        if msg is None:
            idle += 1
            continue
        if msg.error():
            raise RuntimeError(msg.error())
        idle = 0
        value = msg.value()
        magic, schema_id = struct.unpack(">bI", value[:5])
        assert magic == 0, "not Confluent-framed"
        if schema_id not in schemas:
            with urllib.request.urlopen(f"{registry}/schemas/ids/{schema_id}") as r:
                schemas[schema_id] = fastavro.parse_schema(json.loads(json.loads(r.read())["schema"]))
        record = fastavro.schemaless_reader(io.BytesIO(value[5:]), schemas[schema_id])
        record["as_of"] = record["as_of"].isoformat()
        record["_key"] = msg.key().decode()
        print(json.dumps(record))
        out += 1
    consumer.close()
    return 0 if out == count else 1


if __name__ == "__main__":
    sys.exit(main())
