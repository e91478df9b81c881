#!/bin/sh
# Waits for the Temporal frontend at $TEMPORAL_ADDRESS and its namespace
# $TEMPORAL_NAMESPACE, then registers the Keyword search attributes that the
# workflows upsert for the Web UI. Exits 0 once all four are listed, 1 after
# about five minutes without success. The temporal CLI reads
# TEMPORAL_ADDRESS and TEMPORAL_NAMESPACE itself.
set -u
names="RemediationApp RemediationNamespace RemediationStage RemediationOutcome"
tries=0
while [ "$tries" -lt 150 ]; do
    tries=$((tries + 1))
    if temporal operator namespace describe --namespace "$TEMPORAL_NAMESPACE" >/dev/null 2>&1; then
        listed=$(temporal operator search-attribute list --namespace "$TEMPORAL_NAMESPACE" 2>/dev/null || true)
        missing=""
        for name in $names; do
            case "$listed" in
                *"$name"*) ;;
                *) missing="$missing $name" ;;
            esac
        done
        if [ -z "$missing" ]; then
            echo "search attributes registered:$names"
            exit 0
        fi
        for name in $missing; do
            temporal operator search-attribute create --namespace "$TEMPORAL_NAMESPACE" \
                --name "$name" --type Keyword || true
        done
    fi
    sleep 2
done
echo "Temporal at $TEMPORAL_ADDRESS did not accept the search attributes" >&2
exit 1
