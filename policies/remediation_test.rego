# Tests of the decision policy in remediation.rego, in OPA's `test_` style.
#
# tests/unit/test_rego_tests.py runs them through regopy. NOTE: they are
# written for `opa test policies/` too, but no OPA binary has run them yet.
# They call `remediation.decide` with an input object instead of using
# `with input as`, because regopy 1.5.2 (rego-cpp) crashes with a segmentation
# fault on `with input as`. Settings are replaced with `with data.remediation`,
# which rego-cpp evaluates correctly.
package remediation_test

import rego.v1

import data.remediation

# An incident that should be rolled back under the default settings.
rollback_input := {
	"incident_id": "incident-shop-cart",
	"namespace": "shop",
	"app": "cart",
	"alerts_firing": 1,
	"evidence": {
		"namespace": "shop",
		"app": "cart",
		"source": "otlp",
		"has_data": true,
		"no_traffic": false,
		"request_rate": 20.0,
		"error_ratio": 0.4,
		"latency_p99_seconds": 0.2,
		"restarts": 0,
		"points": [],
	},
	"anomaly": {
		"key": "error_ratio",
		"score": 0.97,
		"anomalous": true,
		"sustained_seconds": 75.0,
		"points_scored": 35,
	},
	"change": {
		"found": true,
		"reason": "",
		"suspect_revision": "bad1234",
		"last_good_revision": "good567",
	},
	"budget": {
		"key": "shop/cart",
		"max_rollbacks": 2,
		"window_seconds": 1800.0,
		"used": 0,
		"remaining": 2,
		"entries": [],
		"next_free_at": null,
	},
	"approvals": [],
	"shadow": false,
}

with_evidence(fields) := object.union(rollback_input, {"evidence": object.union(rollback_input.evidence, fields)})

with_anomaly(fields) := object.union(rollback_input, {"anomaly": object.union(rollback_input.anomaly, fields)})

with_budget(fields) := object.union(rollback_input, {"budget": object.union(rollback_input.budget, fields)})

test_rollback_when_all_conditions_hold if {
	d := remediation.decide(rollback_input)
	d.action == "rollback"
	d.allow == true
	d.require_approval == false
	d.shadow == false
	d.max_error_ratio == 0.05
	d.max_latency_p99_seconds == 1
	d.approval_timeout_seconds == 900
	count(d.reasons) == 4
}

test_no_data_escalates if {
	d := remediation.decide(with_evidence({"has_data": false, "error_ratio": null, "latency_p99_seconds": null}))
	d.action == "escalate"
	d.allow == false
	contains(d.reasons[0], "missing data is not evidence")
}

test_no_traffic_escalates if {
	d := remediation.decide(with_evidence({"no_traffic": true, "error_ratio": null}))
	d.action == "escalate"
	d.allow == false
	contains(d.reasons[0], "no traffic")
}

test_unknown_signals_escalate if {
	d := remediation.decide(with_evidence({"error_ratio": null, "latency_p99_seconds": null}))
	d.action == "escalate"
	contains(d.reasons[0], "missing data is not evidence")
}

test_missing_evidence_escalates if {
	d := remediation.decide(object.remove(rollback_input, ["evidence"]))
	d.action == "escalate"
	d.allow == false
}

test_under_thresholds_is_none if {
	d := remediation.decide(with_evidence({"error_ratio": 0.01, "latency_p99_seconds": 0.3}))
	d.action == "none"
	d.allow == false
	startswith(d.reasons[0], "not breaching")
}

test_threshold_itself_is_not_breaching if {
	d := remediation.decide(with_evidence({"error_ratio": 0.05, "latency_p99_seconds": 1.0}))
	d.action == "none"
}

test_latency_breach_counts if {
	d := remediation.decide(with_evidence({"error_ratio": 0.0, "latency_p99_seconds": 2.5}))
	d.action == "rollback"
	contains(d.reasons[0], "p99 latency")
}

test_anomaly_missing_is_none if {
	d := remediation.decide(object.union(rollback_input, {"anomaly": null}))
	d.action == "none"
	d.allow == false
}

test_anomaly_not_anomalous_is_none if {
	d := remediation.decide(with_anomaly({"anomalous": false, "sustained_seconds": 0}))
	d.action == "none"
}

test_min_sustained_setting_applies if {
	d := remediation.decide(rollback_input) with data.remediation.config as {"min_sustained_seconds": 120}
	d.action == "none"
}

test_no_change_escalates if {
	inp := object.union(rollback_input, {"change": {"found": false, "reason": "no deployment history"}})
	d := remediation.decide(inp)
	d.action == "escalate"
	d.allow == false
	d.reasons[count(d.reasons) - 1] == "no suspect change found: no deployment history"
}

test_budget_exhausted_escalates_with_next_slot if {
	d := remediation.decide(with_budget({"used": 2, "remaining": 0, "next_free_at": "2025-01-01T10:30:00Z"}))
	d.action == "escalate"
	d.allow == false
	contains(d.reasons[count(d.reasons) - 1], "2025-01-01T10:30:00Z")
}

test_missing_budget_escalates if {
	d := remediation.decide(object.remove(rollback_input, ["budget"]))
	d.action == "escalate"
}

test_app_max_rollbacks_caps_budget if {
	d := remediation.decide(with_budget({"used": 1, "remaining": 1})) with data.remediation.applications as {"shop/cart": {"max_rollbacks": 1}}
	d.action == "escalate"
	contains(d.reasons[count(d.reasons) - 1], "1 of 1 used")
}

test_global_config_overrides_defaults if {
	d := remediation.decide(rollback_input) with data.remediation.config as {"max_error_ratio": 0.5, "require_approval": true}
	d.action == "none"
	d.max_error_ratio == 0.5
}

test_app_config_overrides_global if {
	d := remediation.decide(rollback_input) with data.remediation.config as {"max_error_ratio": 0.5}
		with data.remediation.applications as {"shop/cart": {"max_error_ratio": 0.1, "require_approval": true, "approval_timeout_seconds": 60}}
	d.action == "rollback"
	d.max_error_ratio == 0.1
	d.require_approval == true
	d.approval_timeout_seconds == 60
}

test_other_app_config_is_ignored if {
	d := remediation.decide(rollback_input) with data.remediation.applications as {"shop/other": {"require_approval": true}}
	d.require_approval == false
}

test_shadow_from_input if {
	d := remediation.decide(object.union(rollback_input, {"shadow": true}))
	d.action == "rollback"
	d.shadow == true
}

test_shadow_from_app_config if {
	d := remediation.decide(rollback_input) with data.remediation.applications as {"shop/cart": {"shadow": true}}
	d.shadow == true
}

test_invalid_setting_escalates if {
	d := remediation.decide(rollback_input) with data.remediation.config as {"max_error_ratio": "0.05"}
	d.action == "escalate"
	d.max_error_ratio == 0.05
	startswith(d.reasons[0], "invalid policy setting max_error_ratio")
}

test_unknown_setting_escalates if {
	d := remediation.decide(rollback_input) with data.remediation.config as {"max_error_rate": 0.1}
	d.action == "escalate"
	d.reasons == ["unknown policy setting max_error_rate"]
}

test_require_approval_only_for_rollback if {
	d := remediation.decide(with_evidence({"error_ratio": 0.0})) with data.remediation.config as {"require_approval": true}
	d.action == "none"
	d.require_approval == false
}

test_invalid_max_rollbacks_escalates if {
	d := remediation.decide(rollback_input) with data.remediation.applications as {"shop/cart": {"max_rollbacks": "2"}}
	d.action == "escalate"
	startswith(d.reasons[0], "invalid policy setting max_rollbacks")
}

test_negative_threshold_escalates if {
	d := remediation.decide(rollback_input) with data.remediation.config as {"max_latency_p99_seconds": -1}
	d.action == "escalate"
	startswith(d.reasons[0], "invalid policy setting max_latency_p99_seconds")
}
