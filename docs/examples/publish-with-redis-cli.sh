#!/bin/sh
# Publish a fleet task without Celery or Python: one Celery protocol-2
# message pushed onto the agent's queue with redis-cli (docs/celery.md).
#
#   publish-with-redis-cli.sh REDIS_URL KEY_PREFIX QUEUE AGENT PAYLOAD_JSON [TASK_ID]
#
# REDIS_URL, KEY_PREFIX (broker_transport_options.global_keyprefix) and QUEUE
# (queues[AGENT]) are what `fleet publisher-config --json` prints. It prints
# the task id: `fleet status ID` and Celery's AsyncResult(ID) follow it.
set -eu
[ $# -ge 5 ] || { echo "usage: $0 REDIS_URL KEY_PREFIX QUEUE AGENT PAYLOAD_JSON [TASK_ID]" >&2; exit 2; }
url=$1 prefix=$2 queue=$3 agent=$4 payload=$5
id=${6:-$(cat /proc/sys/kernel/random/uuid)}
tag=$(cat /proc/sys/kernel/random/uuid)

# The body: [args, kwargs, embed], base64-encoded JSON.
body=$(printf '[[], {"agent": "%s", "payload": %s}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]' \
    "$agent" "$payload" | base64 | tr -d '\n')
message=$(printf '{"body": "%s", "content-encoding": "utf-8", "content-type": "application/json",
 "headers": {"lang": "sh", "task": "fleet.run", "id": "%s", "root_id": "%s", "parent_id": null,
             "group": null, "retries": 0, "eta": null, "expires": null, "timelimit": [null, null]},
 "properties": {"correlation_id": "%s", "reply_to": "", "delivery_mode": 2, "priority": 0,
                "delivery_info": {"exchange": "", "routing_key": "%s"},
                "body_encoding": "base64", "delivery_tag": "%s"}}' \
    "$body" "$id" "$id" "$id" "$queue" "$tag")
redis-cli -u "$url" LPUSH "$prefix$queue" "$message" > /dev/null
echo "$id"
