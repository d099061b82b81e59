{{/* The pieces of the `helm test` pods. */}}

{{/* A test pod's spec around one `python -c` script: (dict "root" $ "name" "health" "script" "..." "args" (list ...)) */}}
{{- define "homefeed.testPod" -}}
{{- $root := .root }}
apiVersion: v1
kind: Pod
metadata:
  name: {{ include "homefeed.fullname" $root }}-test-{{ .name }}
  labels:
    {{- include "homefeed.labels" (dict "root" $root "component" "test") | nindent 4 }}
  annotations:
    helm.sh/hook: test
    helm.sh/hook-weight: "0"
    # kept after a run for its log; replaced by the next `helm test`
    helm.sh/hook-delete-policy: before-hook-creation
spec:
  restartPolicy: Never
  automountServiceAccountToken: false
  enableServiceLinks: false
  securityContext:
    {{- include "homefeed.podSecurityContext" $root | nindent 4 }}
  {{- with include "homefeed.scheduling" $root }}{{ . | trim | nindent 2 }}{{ end }}
  containers:
    - name: {{ .name }}
      image: {{ include "homefeed.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command:
        - python
        - -c
        - |
          {{- .script | nindent 10 }}
      args:
        {{- toYaml .args | nindent 8 }}
      env:
        - name: HOME
          value: /tmp
        {{- if $root.Values.mtls.enabled }}
        - name: HOMEFEED_TLS_CERT
          value: /etc/homefeed/tls/tls.crt
        - name: HOMEFEED_TLS_KEY
          value: /etc/homefeed/tls/tls.key
        - name: HOMEFEED_TLS_CA
          value: /etc/homefeed/tls/ca.crt
        {{- end }}
      resources:
        requests:
          cpu: 50m
          memory: 128Mi
        limits:
          memory: 256Mi
      securityContext:
        {{- include "homefeed.containerSecurityContext" $root | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if $root.Values.mtls.enabled }}
        - name: tls
          mountPath: /etc/homefeed/tls
          readOnly: true
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- if $root.Values.mtls.enabled }}
    - name: tls
      secret:
        secretName: {{ required "mtls.secretName is required when mtls.enabled is true" $root.Values.mtls.secretName }}
        defaultMode: 0440
    {{- end }}
{{- end }}

{{/* A gRPC channel to argv's target, with the client certificate under mTLS (python). */}}
{{- define "homefeed.testChannel" -}}
def channel(target):
    if not os.environ.get("HOMEFEED_TLS_CA"):
        return grpc.insecure_channel(target)
    def read(name):
        with open(os.environ[name], "rb") as f:
            return f.read()
    creds = grpc.ssl_channel_credentials(
        read("HOMEFEED_TLS_CA"), read("HOMEFEED_TLS_KEY"), read("HOMEFEED_TLS_CERT")
    )
    return grpc.secure_channel(target, creds)
{{- end }}
