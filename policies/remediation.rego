# Decision policy of Remediator: may an incident roll its application back?
#
# The incident workflow's `decide` activity queries `data.remediation.decision`
# with the DecisionInput model as `input` (see workflows/models.py). The result
# always has one complete value: an object with `allow`, `action` (rollback,
# escalate or none), `require_approval`, `approval_timeout_seconds`, `reasons`,
# `max_error_ratio`, `max_latency_p99_seconds` and `shadow`.
#
# Settings come from three layers, the later winning:
#   1. `default_config` below,
#   2. `data.remediation.config`, the global override,
#   3. `data.remediation.applications["<namespace>/<app>"]`, per application.
# An unknown setting, or a value of the wrong type or out of range, is reported
# and makes the decision escalate, so a typo never falls back to a default.
#
# The rules evaluate in this order, and the first that matches decides:
#   invalid config           -> escalate
#   no data or no traffic    -> escalate (missing data is not evidence)
#   signals under thresholds -> none
#   anomaly not confirmed    -> none
#   no suspect change        -> escalate
#   rollback budget used up  -> escalate, with the time the next slot frees
#   otherwise                -> rollback (allow), with approval as configured
#
# The logic lives in the function `decide(inp)` so that tests can call it with
# any input. NOTE: regopy 1.5.2 (rego-cpp) crashes with a segmentation fault
# when a test replaces the input with `with input as`, so the tests in
# remediation_test.rego call `decide` and override only `data`.
package remediation

import rego.v1

# Thresholds and behaviour used when no data document overrides them.
# A signal breaches when it is strictly above its threshold, so values at the
# threshold count as healthy, as they do in recovery verification.
default_config := {
	# Fraction of failed requests over the evidence window.
	"max_error_ratio": 0.05,
	# 99th percentile request latency in seconds.
	"max_latency_p99_seconds": 1.0,
	# How long the detector must have seen the anomaly before it counts.
	# 0 accepts any anomalous verdict, because the detector already needs
	# the last point of the series to score at or above its threshold.
	"min_sustained_seconds": 0,
	# Wait for an `approve` signal before acting.
	"require_approval": false,
	# How long to wait for approval before escalating, in seconds.
	"approval_timeout_seconds": 900,
	# Open a draft pull request only, never merge.
	"shadow": false,
}

# Optional per-application cap on rollbacks in the budget window, compared
# with `budget.used`. The budget workflow's own limit applies in any case.
optional_number_settings := {"max_rollbacks"}

decision := decide(input)

# --- settings ----------------------------------------------------------------

app_key(inp) := sprintf("%v/%v", [inp.namespace, inp.app])

global_config := c if {
	c := data.remediation.config
	is_object(c)
} else := {}

app_config(inp) := c if {
	c := data.remediation.applications[app_key(inp)]
	is_object(c)
} else := {}

merged_config(inp) := object.union(object.union(default_config, global_config), app_config(inp))

# `some name` with an index, because rego-cpp 1.5.2 rejects `some k, v in`
# inside a comprehension.
config_errors(inp) := [msg |
	some name
	value := merged_config(inp)[name]
	msg := config_error(name, value)
]

known_setting(name) if {
	_ := default_config[name]
}

known_setting(name) if optional_number_settings[name]

config_error(name, value) := sprintf("unknown policy setting %v", [name]) if {
	not known_setting(name)
} else := sprintf("invalid policy setting %v: %v is not a %v", [name, value, type_name(default_config[name])]) if {
	type_name(value) != type_name(default_config[name])
} else := sprintf("invalid policy setting %v: %v is not a number", [name, value]) if {
	optional_number_settings[name]
	not is_number(value)
} else := sprintf("invalid policy setting %v: %v is negative", [name, value]) if {
	is_number(value)
	value < 0
} else := sprintf("invalid policy setting max_error_ratio: %v is above 1", [value]) if {
	name == "max_error_ratio"
	value > 1
}

# The value of a setting, or its default when the override is invalid, so
# that the decision object keeps the documented types even when it escalates.
setting(inp, name) := value if {
	value := merged_config(inp)[name]
	type_name(value) == type_name(default_config[name])
} else := default_config[name]

# --- evidence ------------------------------------------------------------------

missing_data_reason(inp) := sprintf("no golden-signal data for %v in the window; missing data is not evidence", [app_key(inp)]) if {
	not inp.evidence.has_data == true
} else := sprintf("no traffic for %v in the window; missing data is not evidence", [app_key(inp)]) if {
	inp.evidence.no_traffic == true
} else := sprintf("the error ratio of %v is unknown although it has traffic; missing data is not evidence", [app_key(inp)]) if {
	not is_number(inp.evidence.error_ratio)
}

breaches(inp) := [msg |
	some signal in [
		{"name": "error ratio", "field": "error_ratio", "setting": "max_error_ratio"},
		{"name": "p99 latency (s)", "field": "latency_p99_seconds", "setting": "max_latency_p99_seconds"},
	]
	value := inp.evidence[signal.field]
	is_number(value)
	threshold := setting(inp, signal.setting)
	value > threshold
	msg := sprintf("%v %v is above the threshold %v", [signal.name, value, threshold])
]

within_thresholds_reason(inp) := sprintf(
	"not breaching: error ratio %v (max %v), p99 latency %v s (max %v)",
	[
		object.get(inp.evidence, "error_ratio", null), setting(inp, "max_error_ratio"),
		object.get(inp.evidence, "latency_p99_seconds", null), setting(inp, "max_latency_p99_seconds"),
	],
)

anomaly_confirmed(inp) if {
	inp.anomaly.anomalous == true
	is_number(inp.anomaly.sustained_seconds)
	inp.anomaly.sustained_seconds >= setting(inp, "min_sustained_seconds")
}

anomaly_reason(inp) := sprintf(
	"anomaly confirmed on %v: score %v, sustained for %v s",
	[inp.anomaly.key, inp.anomaly.score, inp.anomaly.sustained_seconds],
) if {
	anomaly_confirmed(inp)
} else := "anomaly not confirmed: the detector returned no verdict" if {
	not is_object(inp.anomaly)
} else := sprintf(
	"anomaly not confirmed on %v: score %v, anomalous %v, sustained for %v s (min %v s)",
	[
		object.get(inp.anomaly, "key", null), object.get(inp.anomaly, "score", null),
		object.get(inp.anomaly, "anomalous", null), object.get(inp.anomaly, "sustained_seconds", null),
		setting(inp, "min_sustained_seconds"),
	],
)

# --- change and budget -----------------------------------------------------------

change_found(inp) if inp.change.found == true

no_change_reason(inp) := sprintf("no suspect change found: %v", [inp.change.reason]) if {
	is_string(inp.change.reason)
	inp.change.reason != ""
} else := "no suspect change found"

change_reason(inp) := sprintf(
	"suspect revision %v, last good revision %v",
	[object.get(inp.change, "suspect_revision", null), object.get(inp.change, "last_good_revision", null)],
)

budget(inp) := b if {
	b := inp.budget
	is_object(b)
} else := {}

# A missing or malformed budget counts as exhausted, so it never allows a rollback.
budget_exhausted(inp) if not is_number(inp.budget.remaining)

budget_exhausted(inp) if inp.budget.remaining <= 0

budget_exhausted(inp) if {
	limit := merged_config(inp).max_rollbacks
	is_number(limit)
	inp.budget.used >= limit
}

budget_exhausted_reason(inp) := sprintf(
	"rollback budget exhausted for %v: %v of %v used in the last %v s; next slot frees at %v",
	[
		app_key(inp), object.get(budget(inp), "used", null), rollback_limit(inp),
		object.get(budget(inp), "window_seconds", null), next_free_at(inp),
	],
)

rollback_limit(inp) := limit if {
	limit := merged_config(inp).max_rollbacks
	is_number(limit)
	limit < object.get(budget(inp), "max_rollbacks", limit + 1)
} else := object.get(budget(inp), "max_rollbacks", null)

next_free_at(inp) := budget(inp).next_free_at if {
	is_string(budget(inp).next_free_at)
} else := "an unknown time"

budget_reason(inp) := sprintf(
	"rollback budget: %v of %v left",
	[object.get(budget(inp), "remaining", null), rollback_limit(inp)],
)

# --- the decision ------------------------------------------------------------------

shadow(inp) if inp.shadow == true

shadow(inp) if setting(inp, "shadow") == true

is_shadow(inp) := true if {
	shadow(inp)
} else := false

# The first matching branch decides, and every branch yields one complete value.
outcome(inp) := escalate(config_errors(inp)) if {
	count(config_errors(inp)) > 0
} else := escalate([missing_data_reason(inp)]) if {
	missing_data_reason(inp)
} else := no_action(array.concat([within_thresholds_reason(inp)], [anomaly_reason(inp) | is_object(inp.anomaly)])) if {
	count(breaches(inp)) == 0
} else := no_action(array.concat(breaches(inp), [anomaly_reason(inp)])) if {
	not anomaly_confirmed(inp)
} else := escalate(array.concat(breaches(inp), [anomaly_reason(inp), no_change_reason(inp)])) if {
	not change_found(inp)
} else := escalate(array.concat(breaches(inp), [anomaly_reason(inp), change_reason(inp), budget_exhausted_reason(inp)])) if {
	budget_exhausted(inp)
} else := rollback(inp, array.concat(breaches(inp), [anomaly_reason(inp), change_reason(inp), budget_reason(inp)]))

escalate(reasons) := {"action": "escalate", "allow": false, "require_approval": false, "reasons": reasons}

no_action(reasons) := {"action": "none", "allow": false, "require_approval": false, "reasons": reasons}

rollback(inp, reasons) := {
	"action": "rollback",
	"allow": true,
	"require_approval": setting(inp, "require_approval"),
	"reasons": array.concat(reasons, rollback_notes(inp)),
}

rollback_notes(inp) := array.concat(
	["approval required before the rollback" | setting(inp, "require_approval") == true],
	["shadow mode: a draft pull request only, never merged" | shadow(inp)],
)

decide(inp) := object.union(outcome(inp), {
	"approval_timeout_seconds": setting(inp, "approval_timeout_seconds"),
	"max_error_ratio": setting(inp, "max_error_ratio"),
	"max_latency_p99_seconds": setting(inp, "max_latency_p99_seconds"),
	"max_rollbacks": rollback_limit(inp),
	"shadow": is_shadow(inp),
})
