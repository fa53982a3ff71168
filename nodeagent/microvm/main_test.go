package microvm_test

import (
	"os"
	"testing"

	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

func TestMain(m *testing.M) { os.Exit(systemdhost.RunWithLeakCheck(m)) }
