package cgroup

// JoinNamespaceForTest exposes joinNamespace to the external tests.
var JoinNamespaceForTest = joinNamespace
