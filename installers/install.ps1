<#
.SYNOPSIS
Install npmguard for the current user and register its logon task; no admin.

.DESCRIPTION
With pipx on PATH, npmguard is installed with `pipx install`. Otherwise it
goes into a venv in %LOCALAPPDATA%\npmguard\venv, and a small npmguard.cmd
in %USERPROFILE%\.local\bin (added to the user PATH) runs it. Then
`npmguard service install` registers the scheduled task that runs the
daemon at logon. Running it again upgrades in place; -Uninstall reverses it.

The Windows counterpart of install.sh. It has not been run in CI, which has
no Windows machine; the sh script is the tested one.

.PARAMETER From
What to install: a source directory, a wheel, or a pip requirement such as
npmguard==0.1.0. Default: the checkout this script is in.

.EXAMPLE
powershell -ExecutionPolicy Bypass -File installers\install.ps1
#>
[CmdletBinding()]
param(
    [string]$From = "",
    [switch]$Venv,
    [switch]$Pipx,
    [switch]$NoService,
    [switch]$Uninstall,
    [switch]$Force
)

Set-StrictMode -Version Latest
$ErrorActionPreference = "Stop"

function Say([string]$Message) { Write-Host "npmguard-install: $Message" }
function Warn([string]$Message) { Write-Warning "npmguard-install: $Message" }
function Die([string]$Message) {
    [Console]::Error.WriteLine("npmguard-install: error: $Message")
    exit 1
}

$AppDir = Join-Path $env:LOCALAPPDATA "npmguard"
$VenvDir = Join-Path $AppDir "venv"
$BinDir = Join-Path $HOME ".local\bin"
$Shim = Join-Path $BinDir "npmguard.cmd"
$Marker = Join-Path $AppDir "installed-with"
$StateDir = if ($env:NPMGUARD_STATE_DIR) { $env:NPMGUARD_STATE_DIR } else { Join-Path $env:LOCALAPPDATA "npmguard" }
$VenvExe = Join-Path $VenvDir "Scripts\npmguard.exe"

function Get-PreviousMethod {
    if (Test-Path -LiteralPath $Marker) { return (Get-Content -LiteralPath $Marker -TotalCount 1).Trim() }
    return ""
}

function Find-Python {
    # The py launcher picks the newest Python 3; python.exe may be the Store stub.
    if ($env:PYTHON) { return @($env:PYTHON) }
    if (Get-Command py -ErrorAction SilentlyContinue) { return @("py", "-3") }
    if (Get-Command python -ErrorAction SilentlyContinue) { return @("python") }
    Die "Python 3.10 or newer is needed; install it from python.org or set PYTHON"
}

function Invoke-Checked([string[]]$Command, [string]$What) {
    $exe = $Command[0]
    $rest = @()
    if ($Command.Length -gt 1) { $rest = $Command[1..($Command.Length - 1)] }
    & $exe @rest
    if ($LASTEXITCODE -ne 0) { Die "$What failed (its output is above)" }
}

function Resolve-Source {
    if (-not $From) {
        $repo = Split-Path -Parent $PSScriptRoot
        if (-not (Test-Path -LiteralPath (Join-Path $repo "pyproject.toml"))) {
            Die "no -From given, and $repo (where this script is) is not an npmguard checkout"
        }
        return $repo
    }
    if (Test-Path -LiteralPath $From -PathType Container) {
        if (-not (Test-Path -LiteralPath (Join-Path $From "pyproject.toml"))) {
            Die "$From is a directory without a pyproject.toml, not an npmguard source tree"
        }
        return (Resolve-Path -LiteralPath $From).Path
    }
    if (Test-Path -LiteralPath $From -PathType Leaf) {
        return (Resolve-Path -LiteralPath $From).Path
    }
    return $From
}

function Install-Npmguard {
    $source = Resolve-Source
    $previous = Get-PreviousMethod
    $method = "venv"
    if ($Pipx) {
        if (-not (Get-Command pipx -ErrorAction SilentlyContinue)) { Die "-Pipx given, but pipx is not on PATH" }
        $method = "pipx"
    } elseif (-not $Venv) {
        if ($previous) { $method = $previous }
        elseif (Get-Command pipx -ErrorAction SilentlyContinue) { $method = "pipx" }
    }
    if ($previous -and $previous -ne $method) {
        Die "npmguard was installed with $previous before; run this script with -Uninstall first"
    }
    New-Item -ItemType Directory -Force -Path $AppDir | Out-Null

    if ($method -eq "pipx") {
        Say "installing $source with pipx"
        Invoke-Checked @("pipx", "install", "--force", $source) "pipx install"
        $cmd = Get-Command npmguard -ErrorAction SilentlyContinue
        $binDir = (& pipx environment --value PIPX_BIN_DIR 2>$null)
        if ($binDir -and (Test-Path -LiteralPath (Join-Path $binDir "npmguard.exe"))) {
            $npmguard = Join-Path $binDir "npmguard.exe"
        } elseif ($cmd) {
            $npmguard = $cmd.Source
        } else {
            Die "pipx installed npmguard, but its command is not found"
        }
    } else {
        if ((Test-Path -LiteralPath $Shim) -and -not ((Get-Content -LiteralPath $Shim -Raw) -match [regex]::Escape($VenvExe))) {
            Die "$Shim exists and is not the one this script makes; move it away first"
        }
        $python = Find-Python
        if (-not (Test-Path -LiteralPath (Join-Path $VenvDir "Scripts\python.exe"))) {
            Say "creating a venv in $VenvDir"
            Invoke-Checked ($python + @("-m", "venv", $VenvDir)) "creating the venv"
        }
        Say "installing $source into $VenvDir"
        $venvPython = Join-Path $VenvDir "Scripts\python.exe"
        Invoke-Checked @($venvPython, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--upgrade", $source) "pip install"
        if (-not (Test-Path -LiteralPath $VenvExe)) { Die "pip did not install npmguard.exe into $VenvDir\Scripts" }
        New-Item -ItemType Directory -Force -Path $BinDir | Out-Null
        # A .cmd file, because making symlinks needs Developer Mode or admin.
        Set-Content -LiteralPath $Shim -Encoding ASCII -Value "@`"$VenvExe`" %*"
        $userPath = [Environment]::GetEnvironmentVariable("Path", "User")
        if (-not $userPath) { $userPath = "" }
        if (-not (($userPath -split ";") -contains $BinDir)) {
            [Environment]::SetEnvironmentVariable("Path", (($userPath.TrimEnd(";") + ";" + $BinDir).TrimStart(";")), "User")
            Say "added $BinDir to your user PATH; new terminals will find npmguard"
        }
        $npmguard = $VenvExe
    }
    Set-Content -LiteralPath $Marker -Encoding ASCII -Value $method

    $version = & $npmguard --version
    if ($LASTEXITCODE -ne 0) { Die "$npmguard does not run" }
    Say "installed $version as $npmguard"
    if (-not $NoService) {
        # Exits 0 once the task file is written, even if registering failed;
        # it says why.
        Invoke-Checked @($npmguard, "service", "install") "npmguard service install"
    }
    Say "done; run ``npmguard doctor`` to check the setup"
}

function Test-HoldsCredentials {
    $index = Join-Path $StateDir "credentials.json"
    if (-not (Test-Path -LiteralPath $index)) { return $false }
    $text = (Get-Content -LiteralPath $index -Raw)
    if ($null -eq $text) { return $false }
    return (($text -replace "\s", "") -ne "{}")
}

function Uninstall-Npmguard {
    $method = Get-PreviousMethod
    if (-not $method -and -not (Test-Path -LiteralPath $Shim) -and -not (Test-Path -LiteralPath $VenvDir)) {
        Say "nothing to uninstall: this script has not installed npmguard here"
        exit 0
    }
    if ((Test-HoldsCredentials) -and -not $Force) {
        Die "npmguard still holds credentials it took out of .npmrc files; run ``npmguard restore`` to put them back first, or pass -Force (they stay in the Credential Locker)"
    }
    $npmguard = $null
    if (Test-Path -LiteralPath $VenvExe) { $npmguard = $VenvExe }
    elseif ($method -eq "pipx") {
        $cmd = Get-Command npmguard -ErrorAction SilentlyContinue
        if ($cmd) { $npmguard = $cmd.Source }
    }
    if ($npmguard) {
        & $npmguard service uninstall
        if ($LASTEXITCODE -ne 0) { Warn "npmguard service uninstall failed; delete the task with: schtasks /Delete /TN npmguard /F" }
    } else {
        Warn "npmguard is not runnable; its scheduled task (if any) was left in place"
    }
    if ($method -eq "pipx") {
        Invoke-Checked @("pipx", "uninstall", "npmguard") "pipx uninstall"
    }
    if ((Test-Path -LiteralPath $Shim) -and ((Get-Content -LiteralPath $Shim -Raw) -match [regex]::Escape($VenvExe))) {
        Remove-Item -LiteralPath $Shim -Force
        Say "removed $Shim"
    }
    if (Test-Path -LiteralPath (Join-Path $VenvDir "pyvenv.cfg")) {
        Remove-Item -LiteralPath $VenvDir -Recurse -Force
        Say "removed $VenvDir"
    }
    if (Test-Path -LiteralPath $Marker) { Remove-Item -LiteralPath $Marker -Force }
    Say "npmguard is uninstalled"
}

if ($Venv -and $Pipx) { Die "-Venv and -Pipx cannot be used together" }
if ($Uninstall) { Uninstall-Npmguard } else { Install-Npmguard }
