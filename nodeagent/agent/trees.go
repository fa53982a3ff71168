package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"

	ctrl "sigs.k8s.io/controller-runtime"

	"github.com/agent-gateway/gateway-operator/nodeagent/apply"
	"github.com/agent-gateway/gateway-operator/nodeagent/drift"
	"github.com/agent-gateway/gateway-operator/nodeagent/layout"
	"github.com/agent-gateway/gateway-operator/nodeagent/release"
)

// releaseTrees keeps what is known of the release trees the profiles run: each tree's digest
// when the agent first saw it staged (or last restaged it), which profiles run it, trees seen
// changed and not yet put back, and the profiles whose tree another profile put back under
// them. The zero value is ready to use.
type releaseTrees struct {
	// mu is held while a tree is digested or restaged, so a digest never sees half a swap.
	mu      sync.Mutex
	digest  map[string]string          // tree (path inside the host) -> release.TreeDigest
	runs    map[string][]string        // profile -> trees of its current and last-good
	changed map[string]string          // tree -> the first file seen changed in it
	owed    map[string][]drift.Finding // profile -> trees put back under it by another profile
}

func (t *releaseTrees) init() {
	if t.digest == nil {
		t.digest, t.runs, t.changed, t.owed = map[string]string{}, map[string][]string{}, map[string]string{}, map[string][]drift.Finding{}
	}
}

// running records the trees a profile runs, digesting each the first time it is seen.
func (t *releaseTrees) running(h layout.Host, profile string, trees []string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.init()
	t.runs[profile] = trees
	for _, tr := range trees {
		if _, ok := t.digest[tr]; !ok {
			if d, err := release.TreeDigest(h.On(tr)); err == nil {
				t.digest[tr] = d
			}
		}
	}
	t.prune()
}

// forget drops a removed profile.
func (t *releaseTrees) forget(profile string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.init()
	delete(t.runs, profile)
	delete(t.owed, profile)
	t.prune()
}

// prune forgets trees no profile runs (they may be collected and staged anew).
func (t *releaseTrees) prune() {
	used := map[string]bool{}
	for _, trs := range t.runs {
		for _, tr := range trs {
			used[tr] = true
		}
	}
	for tr := range t.digest {
		if !used[tr] {
			delete(t.digest, tr)
			delete(t.changed, tr)
		}
	}
}

// treeOf returns the tree of profile's that holds the host path p, or "".
func (t *releaseTrees) treeOf(profile, p string) string {
	for _, tr := range t.runs[profile] {
		if p == tr || strings.HasPrefix(p, tr+"/") {
			return tr
		}
	}
	return ""
}

// findings digests again every tree of profile that a hint points into or that was seen changed
// before, and returns a finding per tree whose digest differs from the staged one, naming the
// first file seen changed; then the trees other profiles put back under this one.
func (t *releaseTrees) findings(h layout.Host, profile string, hints []drift.Hint) []drift.Finding {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.init()
	look := map[string]bool{}
	for _, hn := range hints {
		if hn.Kind != drift.KindRelease {
			continue
		}
		tr := t.treeOf(profile, hn.What)
		if tr == "" {
			continue
		}
		look[tr] = true
		if _, ok := t.changed[tr]; !ok {
			t.changed[tr] = hn.What
		}
	}
	for _, tr := range t.runs[profile] {
		if _, ok := t.changed[tr]; ok {
			look[tr] = true
		}
	}
	var fs []drift.Finding
	for _, tr := range t.runs[profile] {
		if !look[tr] {
			continue
		}
		want, known := t.digest[tr]
		got, err := release.TreeDigest(h.On(tr))
		if err != nil {
			got = "unreadable (" + err.Error() + ")"
		}
		if known && got == want {
			delete(t.changed, tr) // only the agent's own swap, or put back by hand
			continue
		}
		if !known {
			want = "the tree as staged"
		}
		fs = append(fs, drift.Finding{Kind: drift.KindRelease, What: t.changed[tr], Expected: "tree " + want, Found: "tree " + got})
	}
	fs = append(fs, t.owed[profile]...)
	delete(t.owed, profile)
	return fs
}

// heal puts back a changed tree by restage (which fetches and verifies the artifact again),
// unless another profile did already, and records what each sibling running the tree is owed:
// the tree changed under its process too. It returns those siblings.
func (t *releaseTrees) heal(h layout.Host, profile, tree string, restage func() error) ([]string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.init()
	delete(t.owed, profile) // this profile is restarted now
	if want, known := t.digest[tree]; known {
		if got, err := release.TreeDigest(h.On(tree)); err == nil && got == want {
			delete(t.changed, tree)
			return nil, nil // put back already, by a sibling's heal
		}
	}
	what := t.changed[tree]
	if err := restage(); err != nil {
		return nil, err
	}
	d, err := release.TreeDigest(h.On(tree))
	if err != nil {
		return nil, err
	}
	t.digest[tree] = d // the artifact's tree, verified by its sha256
	delete(t.changed, tree)
	var siblings []string
	for p, trs := range t.runs {
		if p != profile && slices.Contains(trs, tree) {
			siblings = append(siblings, p)
			t.owed[p] = append(t.owed[p], drift.Finding{Kind: drift.KindRelease, What: tree,
				Expected: "the tree the gateway started from", Found: fmt.Sprintf("changed (%s) and put back by %s's heal", what, profile)})
		}
	}
	return siblings, nil
}

// healTrees restages the current release's tree when it changed, and tells whether the gateway
// must be restarted: its running process imports from that tree. A changed last-good tree is
// left as found: the instance does not name its artifact's URL, and the gateway does not run it.
// It also returns how many findings it left as found.
func (r *InstanceReconciler) healTrees(ctx context.Context, in apply.Instance, fs []drift.Finding) (bool, int, error) {
	profile := in.Profile
	current := layout.ReleaseDir(in.Release.SHA256, in.Release.Label)
	restart, left := false, 0
	for _, f := range fs {
		if f.Kind != drift.KindRelease {
			continue
		}
		r.trees.mu.Lock()
		tree := r.trees.treeOf(profile, f.What)
		r.trees.mu.Unlock()
		if tree != current {
			ctrl.LoggerFrom(ctx).Info("a changed last-good tree is left as found", "profile", profile, "tree", tree)
			left++
			continue
		}
		restart = true
		siblings, err := r.trees.heal(r.Applier.Host, profile, tree, func() error { return r.Applier.Restage(ctx, in.Release) })
		if err != nil {
			return false, left, fmt.Errorf("restaging %s: %w", tree, err)
		}
		for _, p := range siblings {
			if r.Drift.Notify != nil {
				r.Drift.Notify(p)
			}
		}
	}
	return restart, left, nil
}
