package microvm

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"
)

// The warm guest's protocol before its job (see hack/microvm-guest.sh): it boots without a job,
// writes readyLine on the serial line once, and then reads "job <bytes>\n" and the job archive.
const (
	readyLine = "gwvm ready"
	// readyLimit bounds what the host reads from a booting warm guest before its ready line.
	readyLimit = 64 << 10
	// warmBootTimeout bounds a warm VM's boot up to its ready line.
	warmBootTimeout = time.Minute
	// refillBackoff is the first wait after a warm VM failed to boot; it doubles up to
	// maxRefillBackoff while boots keep failing.
	refillBackoff, maxRefillBackoff = time.Second, time.Minute
)

// pool keeps pre-booted VMs that wait for a job. Each holds one of the Runner's slots while it
// waits; a request claims one, the VM runs that one job and is destroyed, and the pool boots a
// fresh one in the background. A nil *pool is an empty pool that never refills.
type pool struct {
	r       *Runner
	wake    chan struct{}
	stop    context.CancelFunc
	stopped chan struct{}
	wg      sync.WaitGroup // VMs being discarded

	mu   sync.Mutex
	idle []*vm // oldest first
	held map[string]int
}

func newPool(r *Runner) *pool {
	ctx, cancel := context.WithCancel(context.Background())
	p := &pool{r: r, wake: make(chan struct{}, 1), stop: cancel, stopped: make(chan struct{}), held: map[string]int{}}
	go p.run(ctx)
	return p
}

// claim hands profile an idle VM, or says why it gets none.
func (p *pool) claim(profile string) (*vm, string) {
	if p == nil {
		return nil, ""
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	defer p.poke()
	if n := p.held[profile]; n >= p.r.cfg.PoolShare {
		return nil, fmt.Sprintf("profile %s holds its share of %d warm VMs", profile, p.r.cfg.PoolShare)
	}
	for len(p.idle) > 0 {
		v := p.idle[0]
		p.idle = p.idle[1:]
		if v.gone() {
			p.discard(v)
			continue
		}
		p.held[profile]++
		return v, ""
	}
	return nil, "the warm pool is empty"
}

// done ends profile's hold on a VM it claimed.
func (p *pool) done(profile string) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.held[profile]--; p.held[profile] <= 0 {
		delete(p.held, profile)
	}
}

// evictOne gives up the oldest idle VM so that its slot serves a run waiting for one.
func (p *pool) evictOne() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.idle) > 0 {
		v := p.idle[0]
		p.idle = p.idle[1:]
		p.discard(v)
	}
}

// retire ends a VM that served its job in the background and frees its slot.
func (p *pool) retire(v *vm) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.discard(v)
}

// discard ends a VM in the background and frees its slot. Called with p.mu held, so that
// close waits for it.
func (p *pool) discard(v *vm) {
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		p.r.destroy(v)
		p.r.release(v.id)
	}()
}

func (p *pool) idleCount() int {
	if p == nil {
		return 0
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// poke wakes the refill loop: a slot was freed or a VM was claimed.
func (p *pool) poke() {
	if p == nil {
		return
	}
	select {
	case p.wake <- struct{}{}:
	default:
	}
}

// close stops refilling and ends the idle VMs.
func (p *pool) close() {
	if p == nil {
		return
	}
	p.stop()
	<-p.stopped
	p.mu.Lock()
	for _, v := range p.idle {
		p.discard(v)
	}
	p.idle = nil
	p.mu.Unlock()
	p.wg.Wait()
}

// run boots VMs one at a time until the pool is full, replaces VMs idle for longer than
// MaxIdle, and leaves free slots to runs that wait for one.
func (p *pool) run(ctx context.Context) {
	defer close(p.stopped)
	r := p.r
	tick := time.NewTicker(min(r.cfg.MaxIdle/4, 30*time.Second))
	defer tick.Stop()
	backoff := refillBackoff
	for {
		p.recycle()
		if id, ok := p.freeSlot(); ok {
			v, err := r.bootWarm(ctx, id)
			if err == nil {
				p.mu.Lock()
				p.idle = append(p.idle, v)
				p.mu.Unlock()
				backoff = refillBackoff
				continue
			}
			r.release(id)
			if ctx.Err() != nil {
				return
			}
			r.cfg.Log.Error(err, "warm microVM did not boot; retrying", "after", backoff.String())
			select {
			case <-time.After(backoff):
			case <-ctx.Done():
				return
			}
			backoff = min(2*backoff, maxRefillBackoff)
			continue
		}
		select {
		case <-p.wake:
		case <-tick.C:
		case <-ctx.Done():
			return
		}
	}
}

// freeSlot takes a slot for a new warm VM when the pool is short of one and no run waits.
func (p *pool) freeSlot() (ID, bool) {
	p.mu.Lock()
	short := len(p.idle) < p.r.cfg.PoolSize
	p.mu.Unlock()
	if !short || p.r.waiting.Load() > 0 {
		return ID{}, false
	}
	select {
	case id := <-p.r.slots:
		return id, true
	default:
		return ID{}, false
	}
}

// recycle ends idle VMs older than MaxIdle and those whose QEMU is gone.
func (p *pool) recycle() {
	p.mu.Lock()
	defer p.mu.Unlock()
	keep := p.idle[:0]
	for _, v := range p.idle {
		if v.gone() || time.Since(v.ready) > p.r.cfg.MaxIdle {
			p.discard(v)
			continue
		}
		keep = append(keep, v)
	}
	clear(p.idle[len(keep):])
	p.idle = keep
}

func (v *vm) gone() bool {
	select {
	case <-v.exited:
		return true
	default:
		return false
	}
}

// bootWarm boots a VM without a job as id and waits for its ready line. Its unit may live for
// MaxIdle plus the longest run, plus the slack.
func (r *Runner) bootWarm(ctx context.Context, id ID) (*vm, error) {
	ctx, cancel := context.WithTimeout(ctx, warmBootTimeout)
	defer cancel()
	v := &vm{id: id}
	res, err := r.launch(ctx, v, nil, r.cfg.MaxIdle+MaxTimeout+unitRuntimeSlack)
	if err == nil && res.Phase != "" {
		err = errors.New(res.Message)
	}
	if err == nil {
		err = v.qmp.ExecuteCont(ctx)
	}
	if err == nil {
		err = awaitReady(ctx, v.serial)
	}
	if err != nil {
		r.destroy(v)
		return nil, err
	}
	v.ready = time.Now()
	r.cfg.Log.V(1).Info("warm microVM ready", "unit", v.unit, "uid", v.id.UID)
	return v, nil
}

// awaitReady reads a booting warm guest's serial line up to its ready line, at most readyLimit
// bytes. The guest writes nothing more until it has a job: anything after the ready line is a
// broken guest, and the line is never looked for again once the VM is ready.
func awaitReady(ctx context.Context, serial interface {
	io.Reader
	SetReadDeadline(time.Time) error
},
) error {
	stop := context.AfterFunc(ctx, func() { _ = serial.SetReadDeadline(time.Now()) })
	defer stop()
	br := bufio.NewReaderSize(&io.LimitedReader{R: serial, N: readyLimit}, maxLine)
	for {
		line, err := readLine(br)
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("warm guest not ready: %w", context.Cause(ctx))
			}
			return fmt.Errorf("warm guest ended before it was ready: %w", err)
		}
		if string(bytes.TrimRight(line, "\r\n")) != readyLine {
			continue
		}
		if br.Buffered() > 0 {
			return errors.New("the warm guest wrote past its ready line")
		}
		return nil
	}
}
