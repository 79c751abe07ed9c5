// Opens the page in headless Chromium, signs in with a token and reports what it shows.
//
//   node e2e/browse.mjs --url http://tenant_a.localhost:8080/ --token <JWT> \
//       --screenshot out.png [--timeout-ms 20000] [--chromium /usr/bin/chromium] \
//       [--host-resolver-rules "MAP aiops.operator.example 127.0.0.1"]
//
// Prints one line of JSON on stdout and exits 0 once the page showed its company name
// (even when it then shows an error). Exits 1 with a message on stderr when the browser
// could not start or no company name appeared in time; 2 for bad arguments.
// `--token ""` skips signing in and reports the branding only. `--host-resolver-rules` is
// Chromium's own flag: a custom domain reaches the local gateway without DNS.
//
// The report lists every Content-Security-Policy violation the page met (cspViolations) and,
// last, whether an inline <style> the page adds would apply (inlineStyleApplied: it must not
// under the gateway's style-src 'self'); that probe's own violation is not in the list.
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const CHROMIUM_ARGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const byTestId = (id) => `[data-testid="${id}"]`;

function options() {
  const { values } = parseArgs({
    options: {
      url: { type: "string" },
      token: { type: "string", default: "" },
      screenshot: { type: "string" },
      "timeout-ms": { type: "string", default: "20000" },
      chromium: { type: "string", default: "/usr/bin/chromium" },
      "host-resolver-rules": { type: "string", default: "" },
    },
    strict: true,
  });
  const timeout = Number(values["timeout-ms"]);
  if (!values.url || !values.screenshot || !(timeout > 0)) {
    throw new Error("usage: browse.mjs --url URL --token JWT --screenshot PATH [--timeout-ms N] [--chromium PATH]");
  }
  return {
    url: values.url,
    token: values.token.trim(),
    screenshot: values.screenshot,
    timeout,
    executablePath: values.chromium,
    hostResolverRules: values["host-resolver-rules"],
  };
}

/** Everything the report says, read from the page as it is now. */
async function report(page, consoleErrors, failedRequests) {
  const shown = await page.evaluate(() => {
    const text = (id) => document.querySelector(`[data-testid="${id}"]`)?.textContent?.trim() ?? "";
    const header = document.querySelector('[data-testid="brand-header"]');
    const name = document.querySelector('[data-testid="company-name"]');
    const main = document.querySelector("main");
    return {
      companyName: text("company-name"),
      title: document.title,
      primaryColor: header ? getComputedStyle(header).backgroundColor : null,
      companyNameColor: name ? getComputedStyle(name).color : null,
      mainBackground: main ? getComputedStyle(main).backgroundColor : null,
      stylesheets: [...document.styleSheets].map((sheet) => new URL(sheet.href ?? "inline:", location.href).pathname),
      cspViolations: window.__cspViolations ?? [],
      brandPrimaryVar: getComputedStyle(document.documentElement).getPropertyValue("--brand-primary").trim(),
      siteIds: [...document.querySelectorAll('[data-testid="site-row"]')].map((row) => row.getAttribute("data-site-id")),
      siteCount: text("site-count") || null,
      error: text("error") || null,
    };
  });
  return { ...shown, consoleErrors: [...consoleErrors], failedRequests: [...failedRequests] };
}

/** Whether an inline <style> added now applies (it must not under style-src 'self'). */
async function inlineStyleApplies(page) {
  return page.evaluate(async () => {
    const style = document.createElement("style");
    style.textContent = "body { outline: 7px solid rgb(255, 0, 0); }";
    document.head.append(style);
    await new Promise((resolve) => requestAnimationFrame(resolve));
    const applied = getComputedStyle(document.body).outlineWidth === "7px";
    style.remove();
    return applied;
  });
}

async function main() {
  let args;
  try {
    args = options();
  } catch (err) {
    process.stderr.write(`${err.message}\n`);
    return 2;
  }
  let browser;
  try {
    const extra = args.hostResolverRules ? [`--host-resolver-rules=${args.hostResolverRules}`] : [];
    browser = await chromium.launch({ executablePath: args.executablePath, headless: true, args: [...CHROMIUM_ARGS, ...extra] });
  } catch (err) {
    process.stderr.write(`could not start Chromium at ${args.executablePath}: ${err.message}\n`);
    return 1;
  }
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(args.timeout);
    const consoleErrors = [];
    const failedRequests = [];
    // Every CSP violation, as the page's own document reports it (the console shows them too).
    await page.addInitScript(() => {
      window.__cspViolations = [];
      document.addEventListener("securitypolicyviolation", (event) => {
        window.__cspViolations.push(`${event.effectiveDirective} blocked ${event.blockedURI || "inline"}`);
      });
    });
    page.on("console", (message) => {
      if (message.type() === "error") consoleErrors.push(message.text());
    });
    page.on("pageerror", (err) => consoleErrors.push(String(err)));
    page.on("requestfailed", (request) => {
      failedRequests.push(`${request.method()} ${request.url()}: ${request.failure()?.errorText ?? "failed"}`);
    });
    page.on("response", (response) => {
      if (response.status() >= 400) failedRequests.push(`${response.request().method()} ${response.url()}: HTTP ${response.status()}`);
    });

    await page.goto(args.url, { waitUntil: "domcontentloaded" });
    // The company name, or an error that comes first (then there is nothing to wait for).
    await page
      .waitForFunction(
        ([name, error]) =>
          document.querySelector(name)?.textContent?.trim() || document.querySelector(error)?.textContent?.trim(),
        [byTestId("company-name"), byTestId("error")],
      )
      .catch(() => undefined);
    const branded = await report(page, consoleErrors, failedRequests);
    if (!branded.companyName) {
      await page.screenshot({ path: args.screenshot, fullPage: true }).catch(() => undefined);
      process.stderr.write(
        `the page showed no company name within ${args.timeout} ms` +
          (branded.error ? `; it shows the error "${branded.error}"` : "") +
          `\n${JSON.stringify(branded)}\n`,
      );
      return 1;
    }

    if (args.token) {
      await page.fill(byTestId("token"), args.token);
      await page.click(byTestId("sign-in"));
      // Rows, an error, or (for a tenant without sites) the count.
      await page.waitForFunction(
        ([row, error, count]) =>
          document.querySelector(row) ||
          document.querySelector(error)?.textContent?.trim() ||
          document.querySelector(count)?.textContent?.trim(),
        [byTestId("site-row"), byTestId("error"), byTestId("site-count")],
      );
    }
    await page.screenshot({ path: args.screenshot, fullPage: true });
    const shown = await report(page, consoleErrors, failedRequests);
    process.stdout.write(`${JSON.stringify({ ...shown, inlineStyleApplied: await inlineStyleApplies(page) })}\n`);
    return 0;
  } catch (err) {
    process.stderr.write(`browsing ${args.url} failed: ${err.message}\n`);
    return 1;
  } finally {
    await browser.close();
  }
}

process.exitCode = await main();
