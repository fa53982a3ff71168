package isolation_test

import (
	"strconv"
	"testing"

	"github.com/agent-gateway/gateway-operator/nodeagent/isolation"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
)

// TestVerifyTwoProductionProfiles: two Production profiles applied by the agent pass every
// check, each with the other as its sibling, and a second Verify reuses the exposure score.
func TestVerifyTwoProductionProfiles(t *testing.T) {
	f := startTwoProfiles(t)
	for _, p := range []layout.Profile{f.core, f.api} {
		ev := f.verify(p)
		if !ev.Isolated || ev.Failed != "" {
			t.Errorf("%s is not Isolated (failed %q):\n%s", p.Name, ev.Failed, dump(ev))
		}
		if len(ev.Checks) < 17 {
			t.Errorf("%s: only %d checks:\n%s", p.Name, len(ev.Checks), dump(ev))
		}
		if s, err := strconv.ParseFloat(ev.ExposureScore, 64); err != nil || s >= isolation.DefaultMaxExposure {
			t.Errorf("%s: exposure score %q", p.Name, ev.ExposureScore)
		}
		t.Logf("%s:\n%s", p.Name, dump(ev))
	}
	if again := f.verify(f.core); !again.Isolated {
		t.Errorf("second verify of core failed:\n%s", dump(again))
	}
}

// TestVerifyNamesOverriddenProtectSystem: an administrator's drop-in that turns ProtectSystem off
// makes the gateway unit's effective properties differ from the rendered ones, and the exposure
// score is measured again and rises.
func TestVerifyNamesOverriddenProtectSystem(t *testing.T) {
	f := startTwoProfiles(t)
	before := f.verify(f.core)
	f.override(f.core.Unit, "ProtectSystem=no")
	ev := f.verify(f.core)
	assertFailed(t, ev, isolation.CheckProtectSystem)
	if ev.Failed != isolation.CheckProtectSystem {
		t.Errorf("first failed check is %q, want %s:\n%s", ev.Failed, isolation.CheckProtectSystem, dump(ev))
	}
	if ev.ExposureScore == before.ExposureScore {
		t.Errorf("exposure score stayed %s with ProtectSystem=no", ev.ExposureScore)
	}
	// The sibling's unit is untouched.
	if api := f.verify(f.api); !api.Isolated {
		t.Errorf("api is not Isolated:\n%s", dump(api))
	}
}

// TestVerifyCatchesIPAddressDenyReset: a drop-in that resets IPAddressDeny on the gateway unit
// fails the property check.
func TestVerifyCatchesIPAddressDenyReset(t *testing.T) {
	f := startTwoProfiles(t)
	f.override(f.core.Unit, "IPAddressDeny=")
	ev := f.verify(f.core)
	assertFailed(t, ev, isolation.CheckIPAddressDeny)
	assertPassed(t, ev, isolation.CheckEgressDenied) // the probe's own unit is still sealed
}

// TestProbeSeesAHoleInItsSandbox: the probe reports what its sandbox really allows. Each hole is
// punched into the probe unit alone, so the gateway's property checks still pass and only the
// probe can see it.
func TestProbeSeesAHoleInItsSandbox(t *testing.T) {
	f := startTwoProfiles(t)
	f.verify(f.core) // installs the probe unit
	probeUnit := layout.ProbeUnit(f.core.Name)
	for _, tc := range []struct {
		setting, check string
	}{
		{"IPAddressDeny=", isolation.CheckEgressDenied},
		{"ProtectSystem=no", isolation.CheckEtcReadOnly},
		{"CapabilityBoundingSet=CAP_NET_BIND_SERVICE", isolation.CheckNoCapabilities},
	} {
		t.Run(tc.setting, func(t *testing.T) {
			f.override(probeUnit, tc.setting)
			defer f.removeOverride(probeUnit)
			ev := f.verify(f.core)
			assertFailed(t, ev, tc.check)
			assertFailed(t, ev, isolation.CheckProbeSandbox)
			assertPassed(t, ev, isolation.CheckProbeRan)
			for _, name := range []string{isolation.CheckProtectSystem, isolation.CheckIPAddressDeny, isolation.CheckCapabilityBoundingSet} {
				assertPassed(t, ev, name)
			}
		})
	}
	if ev := f.verify(f.core); !ev.Isolated {
		t.Errorf("core is not Isolated once the probe unit is sealed again:\n%s", dump(ev))
	}
}

// TestVerifyCatchesReadableSiblingFiles: a sibling's home opened to everyone, or its env file
// left world-readable, is seen from inside the sandbox.
func TestVerifyCatchesReadableSiblingFiles(t *testing.T) {
	f := startTwoProfiles(t)
	f.chmod(f.api.Home, 0o755)
	ev := f.verify(f.core)
	assertFailed(t, ev, isolation.CheckSiblingHomes)
	assertPassed(t, ev, isolation.CheckSiblingEnvFiles)

	f.chmod(f.api.Home, 0o700)
	f.chmod(f.api.Env, 0o644)
	ev = f.verify(f.core)
	assertFailed(t, ev, isolation.CheckSiblingEnvFiles)
	assertPassed(t, ev, isolation.CheckSiblingHomes)
}
