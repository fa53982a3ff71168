package drift

import (
	"strings"
	"sync"
)

// Tracker keeps, per profile, the state last proven, the hints not yet looked at and the
// findings last reported, so that one change is reported once however many hints it caused.
type Tracker struct {
	// Notify is called after a hint for profile was added (to queue the profile for a look).
	Notify func(profile string)

	mu       sync.Mutex
	expected map[string]Expected
	hints    map[string][]Hint
	reported map[string]string
}

// Add records a hint and notifies.
func (t *Tracker) Add(h Hint) {
	t.mu.Lock()
	if t.hints == nil {
		t.hints = map[string][]Hint{}
	}
	dup := false
	for _, o := range t.hints[h.Profile] {
		if o.Kind == h.Kind && o.What == h.What {
			dup = true // the earliest sign of a change is kept: that is when it happened
			break
		}
	}
	if !dup {
		t.hints[h.Profile] = append(t.hints[h.Profile], h)
	}
	t.mu.Unlock()
	if t.Notify != nil {
		t.Notify(h.Profile)
	}
}

// Take returns and clears a profile's hints.
func (t *Tracker) Take(profile string) []Hint {
	t.mu.Lock()
	defer t.mu.Unlock()
	h := t.hints[profile]
	delete(t.hints, profile)
	return h
}

// Keep puts hints back without notifying: the look they caused was put off until the next
// hint (a unit in transition announces its end).
func (t *Tracker) Keep(profile string, hints []Hint) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.hints == nil {
		t.hints = map[string][]Hint{}
	}
	t.hints[profile] = append(hints, t.hints[profile]...)
}

// Expect records what was just proven for a profile; what was reported before is forgotten.
func (t *Tracker) Expect(profile string, e Expected) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.expected == nil {
		t.expected = map[string]Expected{}
	}
	t.expected[profile] = e
	delete(t.reported, profile)
}

// Expected returns what was last proven for a profile.
func (t *Tracker) Expected(profile string) (Expected, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	e, ok := t.expected[profile]
	return e, ok
}

// Forget drops a profile.
func (t *Tracker) Forget(profile string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.expected, profile)
	delete(t.hints, profile)
	delete(t.reported, profile)
}

// Fresh records findings as reported and tells whether they differ from those reported last
// for the profile (so an unchanged drift is not counted or announced again).
func (t *Tracker) Fresh(profile string, fs []Finding) bool {
	parts := make([]string, len(fs))
	for i, f := range fs {
		parts[i] = f.String()
	}
	key := strings.Join(parts, "\n")
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.reported == nil {
		t.reported = map[string]string{}
	}
	if t.reported[profile] == key {
		return false
	}
	t.reported[profile] = key
	return true
}
