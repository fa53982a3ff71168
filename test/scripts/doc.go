// Package scripts holds the tests of the set-up and lint scripts under hack/: the scripts every
// `make test` and `make demo` starts with must give the same answer every time.
package scripts
