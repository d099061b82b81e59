{{/*
Names, labels and the pieces every homefeed pod shares (podinfo's conventions).
Ports are the mesh's contract, not values: the gateway knows its backends by address.
*/}}

{{- define "homefeed.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource name prefix: <release>-<chart>, or the release name alone when it already holds the
chart name. Truncated to 40 characters so that the longest Service name,
"<fullname>-ranking-canary", stays within the 63 characters of a DNS label.
*/}}
{{- define "homefeed.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "homefeed.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object. Call with (dict "root" $ "component" "<name>").
*/}}
{{- define "homefeed.labels" -}}
helm.sh/chart: {{ include "homefeed.chart" .root }}
{{ include "homefeed.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | replace "+" "_" | trunc 63 | quote }}
app.kubernetes.io/part-of: homefeed
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end }}

{{/*
What a Deployment, Service or NetworkPolicy selects one component by.
*/}}
{{- define "homefeed.selectorLabels" -}}
{{ include "homefeed.releaseSelectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Every pod of the release (the default-deny NetworkPolicy's selector).
*/}}
{{- define "homefeed.releaseSelectorLabels" -}}
app.kubernetes.io/name: {{ include "homefeed.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "homefeed.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "homefeed.trainingImage" -}}
{{- printf "%s:%s" .Values.trainingImage.repository (.Values.trainingImage.tag | default (printf "%s-training" .Chart.AppVersion)) }}
{{- end }}

{{/* ---- the mesh's ports ---- */}}
{{- define "homefeed.ports" -}}
gateway: 50051
retrieval: 50052
features: 50053
ranking: 50054
ranking-canary: 50054
rollout: 50055
rankingAdmin: 50064
rolloutAdmin: 50065
metrics: 9464
redis: 6379
mlflow: 5000
otlpGrpc: 4317
otlpHttp: 4318
jaegerUi: 16686
jaegerAdmin: 14269
{{- end }}

{{/* One port by name: (dict "root" $ "name" "gateway") */}}
{{- define "homefeed.port" -}}
{{- index (include "homefeed.ports" .root | fromYaml) .name }}
{{- end }}

{{/* host:port of a component's Service: (dict "root" $ "component" "ranking") */}}
{{- define "homefeed.address" -}}
{{- printf "%s-%s:%s" (include "homefeed.fullname" .root) .component (include "homefeed.port" (dict "root" .root "name" .component)) }}
{{- end }}

{{/* ---- where the dependencies are ---- */}}
{{- define "homefeed.redisAddress" -}}
{{- if .Values.redis.enabled }}
{{- printf "%s-redis:%s" (include "homefeed.fullname" .) (include "homefeed.port" (dict "root" . "name" "redis")) }}
{{- else }}
{{- required "redis.externalAddress (host:port) is required when redis.enabled is false" .Values.redis.externalAddress }}
{{- end }}
{{- end }}

{{- define "homefeed.mlflowUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s-mlflow:%s" (include "homefeed.fullname" .) (include "homefeed.port" (dict "root" . "name" "mlflow")) }}
{{- else }}
{{- required "mlflow.externalUri is required when mlflow.enabled is false" .Values.mlflow.externalUri }}
{{- end }}
{{- end }}

{{/* The OTLP/gRPC endpoint, empty when tracing is off. */}}
{{- define "homefeed.otlpEndpoint" -}}
{{- if .Values.tracing.enabled }}
{{- if .Values.jaeger.enabled }}
{{- printf "http://%s-jaeger:%s" (include "homefeed.fullname" .) (include "homefeed.port" (dict "root" . "name" "otlpGrpc")) }}
{{- else }}
{{- required "tracing.otlpEndpoint is required when tracing.enabled is true and jaeger.enabled is false" .Values.tracing.otlpEndpoint }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---- the online loop's event log ---- */}}

{{/* Where the event log's directory claim is mounted in the features pod. */}}
{{- define "homefeed.eventLogMount" -}}/var/lib/homefeed/eventlog{{- end }}

{{/* HOMEFEED_EVENT_LOG: redis://<the chart's Redis>/<events.redisDb> (a Redis Stream), or
the dataset's directory on the event-log claim. Fails when the log would not be durable or
would have several writers. */}}
{{- define "homefeed.eventLog" -}}
{{- $events := .Values.events }}
{{- if eq $events.log "redis" }}
{{- if and .Values.redis.enabled (not .Values.redis.persistence.enabled) }}
{{- fail "events.log=redis keeps the event log in the release's Redis, which loses it on every restart with redis.persistence.enabled=false: enable redis.persistence, or set events.log=directory (with features.replicas=1)" }}
{{- end }}
{{- printf "redis://%s/%d" (include "homefeed.redisAddress" .) (int $events.redisDb) }}
{{- else }}
{{- if ne (int .Values.features.replicas) 1 }}
{{- fail (printf "events.log=directory: a directory event log has exactly one writer (it holds a lock), so it needs features.replicas=1, got %d; set features.replicas=1, or events.log=redis to run several features replicas" (int .Values.features.replicas)) }}
{{- end }}
{{- printf "%s/%s" (include "homefeed.eventLogMount" .) .Values.dataset }}
{{- end }}
{{- end }}

{{/* The claim of a directory event log. */}}
{{- define "homefeed.eventLogClaim" -}}
{{- .Values.events.directory.persistence.existingClaim | default (printf "%s-eventlog" (include "homefeed.fullname" .)) }}
{{- end }}

{{- define "homefeed.adminSecretName" -}}
{{- if .Values.admin.token }}
{{- printf "%s-admin" (include "homefeed.fullname" .) }}
{{- else if .Values.admin.existingSecret }}
{{- .Values.admin.existingSecret }}
{{- else }}
{{- fail "admin token missing: set admin.token (the chart renders a Secret) or admin.existingSecret (a Secret you manage); the admin RPCs (Reload, rollouts) refuse every call without one" }}
{{- end }}
{{- end }}

{{- define "homefeed.adminSecretKey" -}}
{{- if .Values.admin.token }}token{{ else }}{{ .Values.admin.existingSecretKey }}{{ end }}
{{- end }}

{{/* HOMEFEED_ADMIN_TOKEN from the Secret: ranking, ranking-canary and the controller only. */}}
{{- define "homefeed.adminTokenEnv" -}}
- name: HOMEFEED_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "homefeed.adminSecretName" . }}
      key: {{ include "homefeed.adminSecretKey" . }}
{{- end }}

{{/* ---- pod and container hardening ---- */}}
{{- define "homefeed.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "homefeed.containerSecurityContext" -}}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
runAsNonRoot: true
capabilities:
  drop:
    - ALL
{{- end }}

{{/* Scheduling shared by every pod. */}}
{{- define "homefeed.scheduling" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* topologySpreadConstraints of one component: (dict "root" $ "component" "gateway") */}}
{{- define "homefeed.topologySpread" -}}
{{- $spread := .root.Values.topologySpread }}
{{- if $spread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ $spread.maxSkew }}
    topologyKey: {{ $spread.topologyKey }}
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "homefeed.selectorLabels" . | nindent 8 }}
    matchLabelKeys:
      - pod-template-hash
{{- end }}
{{- end }}

{{/* Pod annotations: Prometheus scraping and a checksum of the settings (a changed
ConfigMap restarts the pods). (dict "root" $ "metrics" true) */}}
{{- define "homefeed.podAnnotations" -}}
{{- if .metrics }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ include "homefeed.port" (dict "root" .root "name" "metrics") | quote }}
prometheus.io/path: /metrics
{{- end }}
checksum/settings: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
{{- with .root.Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* ---- volumes ---- */}}
{{- define "homefeed.dataVolume" -}}
- name: data
{{- if .Values.data.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.data.persistence.existingClaim | default (printf "%s-data" (include "homefeed.fullname" .)) }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{/* The volumes of a homefeed pod: (dict "root" $ "serving" true) */}}
{{- define "homefeed.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ ternary .root.Values.scratch.tmpSizeLimit .root.Values.scratch.jobTmpSizeLimit .serving }}
- name: home
  emptyDir:
    sizeLimit: {{ .root.Values.scratch.homeSizeLimit }}
{{- if .serving }}
- name: model-cache
  emptyDir:
    sizeLimit: {{ .root.Values.scratch.modelCacheSizeLimit }}
{{- end }}
{{ include "homefeed.dataVolume" .root }}
{{- if .root.Values.mtls.enabled }}
- name: tls
  secret:
    secretName: {{ required "mtls.secretName is required when mtls.enabled is true" .root.Values.mtls.secretName }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- end }}

{{/* Their mounts: the data read-only in serving pods, read-write in the jobs. */}}
{{- define "homefeed.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /var/lib/homefeed
- name: data
  mountPath: /var/lib/homefeed/data
  readOnly: {{ .serving }}
{{- if .serving }}
- name: model-cache
  mountPath: /var/cache/homefeed/models
{{- end }}
{{- if .root.Values.mtls.enabled }}
- name: tls
  mountPath: /etc/homefeed/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* ---- environment ---- */}}

{{/* What every serving container sets for itself:
(dict "root" $ "prefix" "RANKING" "component" "ranking-canary" "port" 50054) */}}
{{- define "homefeed.serverEnv" -}}
- name: HOMEFEED_{{ .prefix }}_HOST
  value: 0.0.0.0
- name: HOMEFEED_{{ .prefix }}_PORT
  value: {{ .port | quote }}
- name: HOMEFEED_{{ .prefix }}_METRICS_PORT
  value: {{ include "homefeed.port" (dict "root" .root "name" "metrics") | quote }}
- name: HOMEFEED_{{ .prefix }}_LOG_LEVEL
  value: {{ .root.Values.logLevel | quote }}
- name: OTEL_SERVICE_NAME
  value: homefeed-{{ .component }}
{{- end }}

{{/* A component's extra settings (its values' env map), sorted by name; a variable the
chart sets itself is refused (two entries of one name break server-side apply).
(dict "env" .Values.gateway.env "set" "<the chart's env list as YAML>" "owner" "gateway") */}}
{{- define "homefeed.extraEnv" -}}
{{- $taken := list }}
{{- range (.set | fromYamlArray) }}{{ $taken = append $taken .name }}{{ end }}
{{- $owner := .owner }}
{{- range $name, $value := .env }}
{{- if has $name $taken }}
{{- fail (printf "%s.env.%s: the chart sets %s itself; change the value that controls it instead" $owner $name $name) }}
{{- end }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* ---- probes ---- */}}

{{/* Native gRPC probes on the serving port (tcpSocket with mTLS, whose client
certificate the kubelet cannot present). A startup probe gives the model download and
warm-up five minutes before liveness counts. (dict "root" $ "port" 50051 "readinessService" "homefeed.feed.v1.FeedService") */}}
{{- define "homefeed.probes" -}}
{{- $check := dict "grpc" (dict "port" .port) }}
{{- $ready := dict "grpc" (dict "port" .port) }}
{{- if .readinessService }}
{{- $ready = dict "grpc" (dict "port" .port "service" .readinessService) }}
{{- end }}
{{- if .root.Values.mtls.enabled }}
{{- $check = dict "tcpSocket" (dict "port" .port) }}
{{- $ready = $check }}
{{- end }}
startupProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 5
  failureThreshold: 60
readinessProbe:
  {{- toYaml $ready | nindent 2 }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}

{{/* ---- the serving Deployment, shared by the five gRPC services ----
(dict "root" $ "component" "ranking" "module" "ranking" "prefix" "RANKING" "values" .Values.ranking
      "replicas" 2 "track" "stable" "adminPort" 50064 "readinessService" "" "admin" true
      "env" "<yaml list>" "serviceAccount" "" "strategy" ""
      "annotations" "<yaml map: more pod annotations>" "extraVolumes" "<yaml list>"
      "extraMounts" "<yaml list>") */}}
{{- define "homefeed.deployment" -}}
{{- $root := .root }}
{{- $port := include "homefeed.port" (dict "root" $root "name" .component) | int }}
{{- $sel := dict "root" $root "component" .component }}
{{- $env := include "homefeed.serverEnv" (dict "root" $root "prefix" .prefix "component" .component "port" $port) }}
{{- with .env }}
{{- $env = printf "%s\n%s" $env . }}
{{- end }}
{{- if .admin }}
{{- $env = printf "%s\n%s" $env (include "homefeed.adminTokenEnv" $root) }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "homefeed.fullname" $root }}-{{ .component }}
  labels:
    {{- include "homefeed.labels" $sel | nindent 4 }}
    {{- with .track }}
    homefeed.io/track: {{ . }}
    {{- end }}
spec:
  {{- if not .autoscaled }}
  replicas: {{ .replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  {{- with .strategy }}
  strategy:
    type: {{ . }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "homefeed.selectorLabels" $sel | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "homefeed.selectorLabels" $sel | nindent 8 }}
        app.kubernetes.io/version: {{ $root.Chart.AppVersion | replace "+" "_" | trunc 63 | quote }}
        app.kubernetes.io/part-of: homefeed
        {{- with .track }}
        homefeed.io/track: {{ . }}
        {{- end }}
      annotations:
        {{- include "homefeed.podAnnotations" (dict "root" $root "metrics" true) | trim | nindent 8 }}
        {{- with .annotations }}{{ . | trim | nindent 8 }}{{ end }}
    spec:
      {{- if .serviceAccount }}
      serviceAccountName: {{ .serviceAccount }}
      automountServiceAccountToken: true
      {{- else }}
      automountServiceAccountToken: false
      {{- end }}
      # no <SERVICE>_PORT=tcp://... variables: with a release named "homefeed", Service
      # homefeed-ranking would inject HOMEFEED_RANKING_PORT into every pod (and so on)
      enableServiceLinks: false
      securityContext:
        {{- include "homefeed.podSecurityContext" $root | nindent 8 }}
      {{- with include "homefeed.scheduling" $root }}{{ . | trim | nindent 6 }}{{ end }}
      {{- with include "homefeed.topologySpread" $sel }}{{ . | trim | nindent 6 }}{{ end }}
      containers:
        - name: {{ .component }}
          image: {{ include "homefeed.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: ["python", "-m", "services.{{ .module }}"]
          ports:
            - name: grpc
              containerPort: {{ $port }}
              protocol: TCP
            {{- with .adminPort }}
            - name: grpc-admin
              containerPort: {{ . }}
              protocol: TCP
            {{- end }}
            - name: metrics
              containerPort: {{ include "homefeed.port" (dict "root" $root "name" "metrics") }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "homefeed.fullname" $root }}-settings
          env:
            {{- $env | trim | nindent 12 }}
            {{- with include "homefeed.extraEnv" (dict "env" .values.env "set" $env "owner" .valuesPath) }}{{ . | trim | nindent 12 }}{{ end }}
          {{- include "homefeed.probes" (dict "root" $root "port" $port "readinessService" .readinessService) | trim | nindent 10 }}
          resources:
            {{- toYaml .values.resources | nindent 12 }}
          securityContext:
            {{- include "homefeed.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            {{- include "homefeed.volumeMounts" (dict "root" $root "serving" true) | nindent 12 }}
            {{- with .extraMounts }}{{ . | trim | nindent 12 }}{{ end }}
      volumes:
        {{- include "homefeed.volumes" (dict "root" $root "serving" true) | nindent 8 }}
        {{- with .extraVolumes }}{{ . | trim | nindent 8 }}{{ end }}
{{- end }}

{{/* The ClusterIP Service of a serving component: (dict "root" $ "component" "gateway" "track" "") */}}
{{- define "homefeed.service" -}}
{{- $sel := dict "root" .root "component" .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "homefeed.fullname" .root }}-{{ .component }}
  labels:
    {{- include "homefeed.labels" $sel | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "homefeed.selectorLabels" $sel | nindent 4 }}
  ports:
    - name: grpc
      port: {{ include "homefeed.port" (dict "root" .root "name" .component) }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- with .adminPort }}
    - name: grpc-admin
      port: {{ . }}
      targetPort: grpc-admin
      protocol: TCP
      appProtocol: grpc
    {{- end }}
{{- end }}

{{/* A PodDisruptionBudget when the component runs more than one pod:
(dict "root" $ "component" "gateway" "replicas" 2 "autoscaling" .Values.gateway.autoscaling) */}}
{{- define "homefeed.pdb" -}}
{{- $pods := int .replicas }}
{{- if and .autoscaling .autoscaling.enabled }}
{{- $pods = int .autoscaling.minReplicas }}
{{- end }}
{{- if gt $pods 1 }}
{{- $sel := dict "root" .root "component" .component }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "homefeed.fullname" .root }}-{{ .component }}
  labels:
    {{- include "homefeed.labels" $sel | nindent 4 }}
spec:
  maxUnavailable: {{ .root.Values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "homefeed.selectorLabels" $sel | nindent 6 }}
{{- end }}
{{- end }}

{{/* A CPU HorizontalPodAutoscaler: (dict "root" $ "component" "gateway" "autoscaling" .Values.gateway.autoscaling) */}}
{{- define "homefeed.hpa" -}}
{{- if .autoscaling.enabled }}
{{- $sel := dict "root" .root "component" .component }}
{{- $name := printf "%s-%s" (include "homefeed.fullname" .root) .component }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ $name }}
  labels:
    {{- include "homefeed.labels" $sel | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ $name }}
  minReplicas: {{ .autoscaling.minReplicas }}
  maxReplicas: {{ .autoscaling.maxReplicas }}
  metrics:
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ .autoscaling.targetCPUUtilizationPercentage }}
{{- end }}
{{- end }}

{{/* HOMEFEED_RANKING_FAULTS from ranking.canary.faults: only the parts that are set. */}}
{{- define "homefeed.faults" -}}
{{- $f := .Values.ranking.canary.faults }}
{{- $parts := list }}
{{- if gt (float64 $f.errorRate) 0.0 }}{{ $parts = append $parts (printf "error_rate=%v" $f.errorRate) }}{{ end }}
{{- if gt (float64 $f.delayMs) 0.0 }}{{ $parts = append $parts (printf "delay_ms=%v" $f.delayMs) }}{{ end }}
{{- if $f.scores }}{{ $parts = append $parts (printf "scores=%s" $f.scores) }}{{ end }}
{{- join "," $parts }}
{{- end }}

{{/* The components a NetworkPolicy peer may name: (dict "root" $ "components" (list "gateway")) */}}
{{- define "homefeed.peerComponents" -}}
- podSelector:
    matchLabels:
      {{- include "homefeed.releaseSelectorLabels" .root | nindent 6 }}
    matchExpressions:
      - key: app.kubernetes.io/component
        operator: In
        values:
          {{- toYaml .components | nindent 10 }}
{{- end }}

{{/* A peer from a configured selector pair: (dict "podSelector" {...} "namespaceSelector" {...}) */}}
{{- define "homefeed.selectorPeer" -}}
- podSelector:
    {{- toYaml .podSelector | nindent 4 }}
  {{- with .namespaceSelector }}
  namespaceSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* The pod of a batch job on the training image, data read-write:
(dict "root" $ "component" "retrain" "values" .Values.retrain "args" (list ...)) */}}
{{- define "homefeed.jobPodSpec" -}}
{{- $root := .root }}
automountServiceAccountToken: false
enableServiceLinks: false
restartPolicy: Never
securityContext:
  {{- include "homefeed.podSecurityContext" $root | nindent 2 }}
{{- include "homefeed.scheduling" $root }}
containers:
  - name: {{ .component }}
    image: {{ include "homefeed.trainingImage" $root }}
    imagePullPolicy: {{ $root.Values.trainingImage.pullPolicy }}
    command:
      {{- toYaml .args | nindent 6 }}
    envFrom:
      - configMapRef:
          name: {{ include "homefeed.fullname" $root }}-settings
    env:
      - name: OTEL_SERVICE_NAME
        value: homefeed-{{ .component }}
    resources:
      {{- toYaml .values.resources | nindent 6 }}
    securityContext:
      {{- include "homefeed.containerSecurityContext" $root | nindent 6 }}
    volumeMounts:
      {{- include "homefeed.volumeMounts" (dict "root" $root "serving" false) | nindent 6 }}
volumes:
  {{- include "homefeed.volumes" (dict "root" $root "serving" false) | nindent 2 }}
{{- end }}
