package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// ReleaseSource says where a release tarball is fetched from.
type ReleaseSource struct {
	// URL of the release tarball (.tar.gz): http, https or file.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=2048
	// +kubebuilder:validation:Pattern=`^(https?|file)://.+$`
	URL string `json:"url"`
}

// ReleaseSpec is one immutable runtime build. To ship a new build, create a new Release and point
// GatewayProfiles at it; the spec of an existing Release cannot change.
type ReleaseSpec struct {
	// Source says where hosts fetch the release tarball from.
	Source ReleaseSource `json:"source"`

	// SHA256 of the tarball, 64 lowercase hex digits. Every host checks it before unpacking.
	// +kubebuilder:validation:Pattern=`^[a-f0-9]{64}$`
	SHA256 string `json:"sha256"`

	// Label names the release for people, e.g. "1.4.2". It is part of the release folder's name
	// on each host: `/opt/agent/releases/<sha256>-<label>`.
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$`
	Label string `json:"label"`
}

// ReleaseStatus is what the controller observed of a Release.
type ReleaseStatus struct {
	// ObservedGeneration is the generation this status was computed for.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// Conditions: Ready is True when the spec is valid and usable by profiles.
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`

	// Profiles lists the GatewayProfiles that reference this Release. While it is not empty the
	// Release cannot be deleted.
	// +listType=set
	// +optional
	Profiles []string `json:"profiles,omitempty"`
}

// Release is an immutable runtime build: a tarball URL, its sha256 and a label.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=grel,categories=gateway
// +kubebuilder:printcolumn:name="Label",type=string,JSONPath=`.spec.label`
// +kubebuilder:printcolumn:name="SHA256",type=string,JSONPath=`.spec.sha256`,priority=1
// +kubebuilder:printcolumn:name="URL",type=string,JSONPath=`.spec.source.url`,priority=1
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type Release struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// Spec is the build. It is immutable once created.
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="spec is immutable: a Release names one build forever; create a new Release instead"
	Spec ReleaseSpec `json:"spec"`

	// Status is written by the controller manager.
	// +optional
	Status ReleaseStatus `json:"status,omitempty"`
}

// +kubebuilder:object:root=true

// ReleaseList is a list of Releases.
type ReleaseList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []Release `json:"items"`
}

func init() {
	register(&Release{}, &ReleaseList{})
}
