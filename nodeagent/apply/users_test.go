package apply_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	v1 "github.com/agent-gateway/gateway-operator/api/v1alpha1"
	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/users"
	"github.com/agent-gateway/gateway-operator/test/agentruntime"
	"github.com/agent-gateway/gateway-operator/test/systemdhost"
)

// hostState lists what an apply could change on a host: every entry under /opt and
// /etc/systemd/system with its type, mode, owner and (for files and links) content, and the
// passwd and group databases.
func hostState(t *testing.T, root string) string {
	t.Helper()
	var b strings.Builder
	for _, top := range []string{"opt", "etc/systemd/system"} {
		err := filepath.WalkDir(filepath.Join(root, top), func(p string, d fs.DirEntry, err error) error {
			if errors.Is(err, fs.ErrNotExist) && p == filepath.Join(root, top) {
				return nil
			}
			if err != nil {
				return err
			}
			fi, err := d.Info()
			if err != nil {
				return err
			}
			st := fi.Sys().(*syscall.Stat_t)
			fmt.Fprintf(&b, "%s %v %d:%d", strings.TrimPrefix(p, root), fi.Mode(), st.Uid, st.Gid)
			switch {
			case fi.Mode()&fs.ModeSymlink != 0:
				target, err := os.Readlink(p)
				if err != nil {
					return err
				}
				fmt.Fprintf(&b, " -> %s", target)
			case fi.Mode().IsRegular():
				data, err := os.ReadFile(p) //nolint:gosec // the test's own sandbox host, which nothing else changes meanwhile
				if err != nil {
					return err
				}
				fmt.Fprintf(&b, " %x", sha256.Sum256(data))
			}
			b.WriteString("\n")
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, db := range []string{"etc/passwd", "etc/group"} {
		data, err := os.ReadFile(filepath.Join(root, db))
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s:\n%s", db, data)
	}
	return b.String()
}

func mustFail(t *testing.T, err error, step apply.Step, reason string) *apply.Failure {
	t.Helper()
	var fail *apply.Failure
	if !errors.As(err, &fail) || fail.Step != step || fail.Reason != reason {
		t.Fatalf("apply: %v; want a %s failure at %s", err, reason, step)
	}
	if fail.Retry {
		t.Errorf("a %s failure is marked retryable", reason)
	}
	return fail
}

// TestProfileNamedLikeAnAgentAccountIsRefused: a profile called microvm would run as
// agent-microvm, the account QEMU runs as. It is refused before anything on the host is
// written, even on a host where the agent made agent-microvm for its microVMs.
func TestProfileNamedLikeAnAgentAccountIsRefused(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	if _, err := (users.Manager{Root: f.host.Root}).Ensure("agent-microvm", users.RoleMicroVM); err != nil {
		t.Fatal(err)
	}
	before := hostState(t, f.host.Root)

	_, err := f.applier.Apply(context.Background(), instance("microvm", r1))
	fail := mustFail(t, err, apply.StepPrepare, "InvalidName")
	if !strings.Contains(fail.Message, "reserved") {
		t.Errorf("the refusal does not say the name is reserved: %s", fail.Message)
	}
	if after := hostState(t, f.host.Root); after != before {
		t.Errorf("a refused profile changed the host:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if n := f.server.Requests("1.0.0.tar.gz"); n != 0 {
		t.Errorf("the release of a refused profile was fetched %d times", n)
	}
}

// TestExistingUserIsNeverAdopted: a user agent-<p> (or the shared user agent) that the agent
// did not create fails the apply with UserConflict; the host, and the sibling running on it,
// are left exactly as they were.
func TestExistingUserIsNeverAdopted(t *testing.T) {
	f := newFixture(t, systemdhost.Options{})
	r1 := f.publish(agentruntime.Options{Version: "1.0.0"})
	r2 := f.publish(agentruntime.Options{Version: "2.0.0"})
	f.mustApply(instance("core", r1))
	corePID := f.mainPID("core")

	// An administrator (or a package) made these accounts on the host for something else.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, name := range []string{"agent-foo", "agent"} {
		if out, err := f.host.Exec(ctx, "useradd", "--system", "--user-group", "--no-create-home", "--comment", "agent gateway", name); err != nil {
			t.Fatalf("useradd %s on the host: %v %s", name, err, out)
		}
	}
	before := hostState(t, f.host.Root)

	foo := instance("foo", r2)
	_, err := f.applier.Apply(ctx, foo)
	fail := mustFail(t, err, apply.StepPrepare, "UserConflict")
	if !strings.Contains(fail.Message, "agent-foo") || !strings.Contains(fail.Message, "not created by the agent") {
		t.Errorf("the failure does not name the user and the cause: %s", fail.Message)
	}

	bar := instance("bar", r2)
	bar.Isolation = v1.IsolationConvenience
	_, err = f.applier.Apply(ctx, bar)
	if fail := mustFail(t, err, apply.StepPrepare, "UserConflict"); !strings.Contains(fail.Message, "user agent:") {
		t.Errorf("the failure does not name the shared user: %s", fail.Message)
	}

	if after := hostState(t, f.host.Root); after != before {
		t.Errorf("a refused apply changed the host:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if n := f.server.Requests("2.0.0.tar.gz"); n != 0 {
		t.Errorf("the release of a refused profile was fetched %d times", n)
	}
	f.assertServes("core", r1)
	if got := f.mainPID("core"); got != corePID {
		t.Errorf("core was restarted (pid %d -> %d)", corePID, got)
	}
	// The users the agent made itself keep working.
	if again := f.mustApply(instance("core", r1)); again.Restarted {
		t.Error("re-applying core restarted it")
	}
}
