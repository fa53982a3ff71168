package isolation

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/proof"
)

var exposureRE = regexp.MustCompile(`Overall exposure level for \S+: ([0-9]+\.[0-9]+)`)

// exposure returns the unit's exposure score and the check against the threshold. The score is
// measured again whenever any of the unit's files on disk changed, and reused otherwise.
func (v *Verifier) exposure(ctx context.Context, unitName string) (string, Check) {
	limit := orDefault(v.MaxExposure, DefaultMaxExposure)
	key := v.unitDigest(unitName)
	v.mu.Lock()
	score, ok := v.scores[key]
	v.mu.Unlock()
	if !ok {
		var err error
		if score, err = v.measure(ctx, unitName); err != nil {
			return "", Check{Name: CheckExposure, Message: "could not measure the exposure score: " + err.Error()}
		}
		v.mu.Lock()
		if v.scores == nil {
			v.scores = map[string]string{}
		}
		v.scores[key] = score
		v.mu.Unlock()
	}
	f, err := strconv.ParseFloat(score, 64)
	switch {
	case err != nil:
		return score, Check{Name: CheckExposure, Message: fmt.Sprintf("unreadable exposure score %q", score)}
	case f >= limit:
		return score, Check{Name: CheckExposure, Message: fmt.Sprintf("exposure score %s is not under %.1f", score, limit)}
	}
	return score, Check{Name: CheckExposure, Passed: true, Message: fmt.Sprintf("exposure score %s, under %.1f", score, limit)}
}

// unitDigest digests the names and contents of the files `systemd-analyze --offline` reads for
// the unit: its template and every drop-in on disk.
func (v *Verifier) unitDigest(unitName string) string {
	files := append([]string{path.Join(layout.UnitDir, layout.TemplateUnit)}, proof.DropInFiles(v.Host, unitName)...)
	sort.Strings(files[1:])
	h := sha256.New()
	h.Write([]byte(unitName + "\x00"))
	for _, f := range files {
		b, err := os.ReadFile(v.Host.On(f)) //nolint:gosec // unit files under the root-owned unit folders
		h.Write([]byte(f + "\x00"))
		if err == nil {
			h.Write(b)
		}
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))
}

// measure runs `systemd-analyze security` on the unit files under the root prefix.
func (v *Verifier) measure(ctx context.Context, unitName string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, orDefault(v.ExposureTimeout, DefaultExposureTimeout))
	defer cancel()
	// A fixed binary and a validated unit name, without a shell.
	cmd := v.Host.Command(ctx, layout.SystemdAnalyze, "security", "--offline=yes", "--root="+v.Host.ToolRoot(), "--no-pager", unitName)
	cmd.Env = append(os.Environ(), "SYSTEMD_COLORS=0")
	out, err := cmd.CombinedOutput()
	m := exposureRE.FindSubmatch(out)
	if m == nil {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		return "", fmt.Errorf("systemd-analyze security %s: %v: %s", unitName, err, lines[len(lines)-1])
	}
	return string(m[1]), nil
}
