package systemdhost

// CgroupRoot is the cgroup2 hierarchy the hosts' cgroups live in, as the test process sees
// it: a path from /proc/<pid>/cgroup's "0::" line is relative to it.
func CgroupRoot() (string, error) { return cgroupRoot() }
