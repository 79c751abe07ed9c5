// The tenant's page: branding from GetBranding (public), then the tenant's sites from
// ListSites with the bearer token pasted into the sign-in form. gRPC-web to the page's
// own origin, where the gateway derives the tenant from the subdomain.
import { Code, ConnectError, createClient, type Client } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { SiteService, type Site } from "./gen/towerco/sites/v1/sites_service_pb";
import { TenantRegistryService, type Branding } from "./gen/towerco/tenant/v1/tenant_registry_service_pb";

const TOKEN_KEY = "towerco.token";
const CALL_TIMEOUT_MS = 10_000;
const COLOR = /^#[0-9A-Fa-f]{6}$/;

const transport = createGrpcWebTransport({ baseUrl: location.origin });
const registry: Client<typeof TenantRegistryService> = createClient(TenantRegistryService, transport);
const sites: Client<typeof SiteService> = createClient(SiteService, transport);

/** The element with this data-testid, which index.html must have. */
function byTestId<T extends HTMLElement>(id: string, type: new () => T): T {
  const element = document.querySelector(`[data-testid="${id}"]`);
  if (!(element instanceof type)) throw new Error(`index.html lacks a ${type.name} data-testid="${id}"`);
  return element;
}

const ui = {
  companyName: byTestId("company-name", HTMLHeadingElement),
  logo: byTestId("logo", HTMLImageElement),
  form: byTestId("sign-in-form", HTMLFormElement),
  token: byTestId("token", HTMLTextAreaElement),
  signIn: byTestId("sign-in", HTMLButtonElement),
  signOut: byTestId("sign-out", HTMLButtonElement),
  error: byTestId("error", HTMLParagraphElement),
  siteCount: byTestId("site-count", HTMLParagraphElement),
  table: byTestId("sites", HTMLTableElement),
};

// ---- errors -------------------------------------------------------------------------

type ErrorSource = "branding" | "sites";
let errorSource: ErrorSource | null = null;

/** `PermissionDenied` -> `permission_denied`, the gRPC status name in lower case. */
function statusName(code: Code): string {
  return Code[code].replace(/[A-Z]/g, (c, i: number) => (i > 0 ? "_" : "") + c.toLowerCase());
}

function showError(source: ErrorSource, reason: unknown): void {
  const err = ConnectError.from(reason);
  const name = statusName(err.code);
  ui.error.textContent = err.rawMessage ? `${name}: ${err.rawMessage}` : name;
  ui.error.hidden = false;
  errorSource = source;
}

/** Clears the error shown, if it came from the same kind of call. */
function clearError(source: ErrorSource): void {
  if (errorSource !== source) return;
  ui.error.textContent = "";
  ui.error.hidden = true;
  errorSource = null;
}

// ---- branding -----------------------------------------------------------------------

function setColor(variable: string, color: string): void {
  if (COLOR.test(color)) document.documentElement.style.setProperty(variable, color);
  else document.documentElement.style.removeProperty(variable); // the neutral theme in CSS
}

function httpsUrl(value: string): string | null {
  try {
    const url = new URL(value);
    return url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function applyBranding(branding: Branding): void {
  const company = branding.companyName || branding.displayName;
  setColor("--brand-primary", branding.primaryColor);
  setColor("--brand-secondary", branding.secondaryColor);
  ui.companyName.textContent = company;
  document.title = company;
  const logo = httpsUrl(branding.logoUrl);
  if (logo) {
    ui.logo.alt = `${company} logo`;
    ui.logo.src = logo;
    ui.logo.hidden = false;
  } else {
    ui.logo.removeAttribute("src");
    ui.logo.hidden = true;
  }
}

async function loadBranding(): Promise<void> {
  try {
    const branding = await registry.getBranding({ host: location.hostname }, { timeoutMs: CALL_TIMEOUT_MS });
    applyBranding(branding);
    clearError("branding");
  } catch (err) {
    showError("branding", err);
  }
}

// ---- sites --------------------------------------------------------------------------

function siteRow(site: Site): HTMLTableRowElement {
  const row = document.createElement("tr");
  row.dataset.testid = "site-row";
  row.dataset.siteId = site.siteId;
  for (const text of [site.siteId, site.name, site.location?.region ?? "", site.location?.countryCode ?? ""]) {
    row.insertCell().textContent = text;
  }
  return row;
}

function renderSites(list: readonly Site[] | null, more = false): void {
  const body = ui.table.tBodies[0] ?? ui.table.createTBody();
  body.replaceChildren(...(list ?? []).map(siteRow));
  ui.table.hidden = list === null;
  if (list === null) ui.siteCount.textContent = "";
  else ui.siteCount.textContent = `${list.length} ${list.length === 1 ? "site" : "sites"}${more ? " (first page)" : ""}`;
}

function storedToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

function setSignedIn(signedIn: boolean): void {
  ui.signOut.hidden = !signedIn;
}

let listing = 0; // answers of a superseded ListSites are dropped

async function listSites(token: string): Promise<void> {
  const call = ++listing;
  ui.signIn.disabled = true;
  try {
    const response = await sites.listSites(
      { pageSize: 100 },
      { headers: { authorization: `Bearer ${token}` }, timeoutMs: CALL_TIMEOUT_MS },
    );
    if (call !== listing) return;
    renderSites(response.sites, response.nextPageToken !== "");
    clearError("sites");
  } catch (err) {
    if (call !== listing) return;
    renderSites(null);
    showError("sites", err);
    if (ConnectError.from(err).code === Code.Unauthenticated) forgetToken(); // expired or bad: ask again
  } finally {
    if (call === listing) ui.signIn.disabled = false;
  }
}

function signIn(event: SubmitEvent): void {
  event.preventDefault();
  const token = ui.token.value.trim().replace(/^Bearer\s+/i, "");
  if (!token) {
    showError("sites", new ConnectError("paste a token to sign in", Code.Unauthenticated));
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  ui.token.value = "";
  setSignedIn(true);
  void listSites(token);
}

function forgetToken(): void {
  sessionStorage.removeItem(TOKEN_KEY);
  setSignedIn(false);
}

function signOut(): void {
  listing++;
  forgetToken();
  renderSites(null);
  clearError("sites");
  ui.signIn.disabled = false;
}

// ---- start --------------------------------------------------------------------------

function start(): void {
  ui.form.addEventListener("submit", signIn);
  ui.signOut.addEventListener("click", signOut);
  ui.logo.addEventListener("error", () => (ui.logo.hidden = true));
  renderSites(null);
  const token = storedToken();
  setSignedIn(token !== null);
  void loadBranding();
  if (token !== null) void listSites(token);
}

start();
